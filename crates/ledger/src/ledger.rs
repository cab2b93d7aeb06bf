//! Accounts, transfers, holds and the batch state machine.

use std::collections::{BTreeMap, HashMap};

use crate::hash::IdHashBuilder;
use crate::map::ShardedMap;
use crate::money::{Amount, Currency};

/// Microseconds since the Unix epoch. Time is an argument of the ledger, never read by it.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Debug, Default)]
pub struct Timestamp(pub u64);

impl Timestamp {
    pub fn saturating_add_secs(self, secs: u64) -> Timestamp {
        Timestamp(self.0.saturating_add(secs.saturating_mul(1_000_000)))
    }
}

#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Debug)]
pub struct AccountId(pub u64);

#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Debug)]
pub struct TransferId(pub u128);

/// What an account is for, which decides the limit its balance must respect.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum AccountKind {
    /// A payer's prepaid wallet: never below zero.
    PayerWallet,
    /// A merchant's earnings: never below zero.
    Merchant,
    /// The platform's fee income: never below zero.
    PlatformFees,
    /// Money outside the ledger (a funding provider, a payout rail). Its balance mirrors what
    /// came in, so it is negative and has no limit.
    ExternalFunding,
}

impl AccountKind {
    pub fn debits_must_not_exceed_credits(self) -> bool {
        !matches!(self, AccountKind::ExternalFunding)
    }

    pub fn to_u8(self) -> u8 {
        match self {
            AccountKind::PayerWallet => 1,
            AccountKind::Merchant => 2,
            AccountKind::PlatformFees => 3,
            AccountKind::ExternalFunding => 4,
        }
    }

    pub fn from_u8(value: u8) -> Option<AccountKind> {
        Some(match value {
            1 => AccountKind::PayerWallet,
            2 => AccountKind::Merchant,
            3 => AccountKind::PlatformFees,
            4 => AccountKind::ExternalFunding,
            _ => return None,
        })
    }
}

/// An account keeps totals; balances are derived from them, never stored.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub struct Account {
    pub id: AccountId,
    pub kind: AccountKind,
    pub currency: Currency,
    pub debits_posted: u64,
    pub credits_posted: u64,
    pub debits_pending: u64,
    pub credits_pending: u64,
}

impl Account {
    fn new(id: AccountId, kind: AccountKind, currency: Currency) -> Account {
        Account {
            id,
            kind,
            currency,
            debits_posted: 0,
            credits_posted: 0,
            debits_pending: 0,
            credits_pending: 0,
        }
    }

    /// Posted credits less posted debits.
    pub fn posted_balance(&self) -> i128 {
        i128::from(self.credits_posted) - i128::from(self.debits_posted)
    }

    /// What may still be spent: posted balance less the holds against it.
    pub fn available(&self) -> i128 {
        self.posted_balance() - i128::from(self.debits_pending)
    }
}

/// What a transfer does.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum TransferKind {
    /// Moves money at once.
    Posted,
    /// Places a hold: the amount is reserved on both sides until posted, voided or expired.
    /// `timeout_secs == 0` means the hold never expires.
    Pending { timeout_secs: u32 },
    /// Completes a hold, for its whole amount or (with `amount` smaller) part of it; the rest is
    /// released. The transfer's own accounts must be those of the hold.
    PostPending { pending_id: TransferId },
    /// Releases a hold.
    VoidPending { pending_id: TransferId },
}

/// One request to move money. Transfers flagged `linked` form a chain with the next one: all
/// of a chain succeeds or none of it does.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub struct Transfer {
    pub id: TransferId,
    pub debit: AccountId,
    pub credit: AccountId,
    pub amount: Amount,
    pub kind: TransferKind,
    pub linked: bool,
}

/// Why a transfer was not applied, in the order the checks run.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum TransferRejection {
    /// Another transfer of its linked chain failed.
    LinkedEventFailed,
    /// The batch ended while a linked chain was still open.
    LinkedEventChainOpen,
    IdMustNotBeZero,
    /// The id was used before with different fields. (Used before with the same fields, a
    /// transfer gets its first outcome back instead.)
    ExistsWithDifferentFields,
    // Posted and pending transfers:
    AccountsMustBeDifferent,
    AmountMustNotBeZero,
    // Posts and voids:
    PendingTransferNotFound,
    PendingTransferAlreadyPosted,
    PendingTransferAlreadyVoided,
    PendingTransferExpired,
    /// A post or void names accounts other than those of its hold.
    PendingTransferHasDifferentAccounts,
    ExceedsPendingAmount,
    // Every transfer:
    DebitAccountNotFound,
    CreditAccountNotFound,
    CurrenciesMustMatch,
    /// A total would exceed [`TOTAL_MICROS_MAX`].
    Overflow,
    /// The debit would take a limited account below zero.
    ExceedsAvailableBalance,
}

/// Why an account could not be created.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum AccountRejection {
    IdMustNotBeZero,
    ExistsWithDifferentFields,
}

/// The state of a hold.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum HoldState {
    Pending,
    Posted,
    Voided,
    Expired,
}

/// A transfer as recorded: enough to answer a retry and to resolve holds.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub struct TransferRecord {
    pub transfer: Transfer,
    pub timestamp: Timestamp,
    /// The outcome the id received first; retries return it again.
    pub outcome: Result<(), TransferRejection>,
    /// For a `Pending` transfer that was applied: where its hold stands.
    pub hold: Option<HoldState>,
    pub expires_at: Option<Timestamp>,
}

/// The whole ledger: accounts and every transfer id ever seen.
#[derive(Clone, Debug, Default)]
pub struct Ledger {
    accounts: ShardedMap<AccountId, Account, IdHashBuilder>,
    transfers: TransferTable,
    /// Holds with a deadline, by deadline. Entries are not removed when a hold resolves early;
    /// expiry checks the hold's state, so a stale entry is skipped.
    expiries: BTreeMap<(Timestamp, TransferId), ()>,
    /// Whether [`Ledger::hold_changes`] is kept: only for a store that takes it (a whole
    /// ledger nobody writes back would keep one id per settled hold for ever).
    tracks_hold_changes: bool,
    /// Holds whose state changed (posted, voided, expired) since [`Ledger::take_hold_changes`],
    /// for a store that keeps transfer records outside memory. May repeat an id.
    hold_changes: Vec<TransferId>,
}

/// Transfer records made here, in the order they were made, with an index by id.
///
/// Records live in one growing vector and the map holds positions only: inserting large
/// records into a hash table touches a random page per insert, which costs more than the
/// rest of the transfer.
#[derive(Clone, Debug, Default)]
pub struct TransferRecords {
    records: Vec<TransferRecord>,
    index: HashMap<TransferId, usize, IdHashBuilder>,
    /// No record here has a larger id. Ids grow with time, so a new id is above it and is
    /// known absent without a look into the index (a cache miss in a large one).
    id_max: IdMax,
}

/// The largest id put in a table, for answering "absent" to a larger one without looking.
/// Kept when ids leave: a stale bound only costs a look.
#[derive(Clone, Copy, Debug, Default)]
pub struct IdMax(Option<u128>);

impl IdMax {
    /// Notes an id put in the table.
    #[inline]
    pub fn note(&mut self, id: u128) {
        self.0 = Some(self.0.map_or(id, |max| max.max(id)));
    }

    /// Whether the table may hold `id`: false means certainly not.
    #[inline]
    pub fn may_hold(&self, id: u128) -> bool {
        self.0.is_some_and(|max| id <= max)
    }
}

impl TransferRecords {
    pub fn get(&self, id: &TransferId) -> Option<&TransferRecord> {
        if !self.id_max.may_hold(id.0) {
            return None;
        }
        self.index.get(id).map(|&at| &self.records[at])
    }

    fn get_mut(&mut self, id: &TransferId) -> Option<&mut TransferRecord> {
        if !self.id_max.may_hold(id.0) {
            return None;
        }
        self.index.get(id).map(|&at| &mut self.records[at])
    }

    pub fn len(&self) -> usize {
        self.records.len()
    }

    pub fn is_empty(&self) -> bool {
        self.records.is_empty()
    }

    /// The records in the order they were made.
    pub fn as_slice(&self) -> &[TransferRecord] {
        &self.records
    }

    fn push(&mut self, record: TransferRecord) {
        self.id_max.note(record.transfer.id.0);
        let previous = self.index.insert(record.transfer.id, self.records.len());
        assert!(previous.is_none(), "a transfer id is recorded once");
        self.records.push(record);
    }

    /// Removes the newest record, which must be `id`'s.
    fn pop(&mut self, id: TransferId) {
        let record = self.records.pop().expect("a record to remove");
        assert_eq!(
            record.transfer.id, id,
            "rollback removes the newest records, newest first"
        );
        self.index.remove(&id);
    }
}

/// Every transfer record the ledger holds: those made here, in order, and those loaded from
/// storage, which a working set or a cache holds to answer a reused id.
#[derive(Clone, Debug, Default)]
struct TransferTable {
    made: TransferRecords,
    loaded: HashMap<TransferId, TransferRecord, IdHashBuilder>,
    loaded_id_max: IdMax,
}

impl TransferTable {
    fn get(&self, id: &TransferId) -> Option<&TransferRecord> {
        self.made.get(id).or_else(|| {
            if self.loaded_id_max.may_hold(id.0) {
                self.loaded.get(id)
            } else {
                None
            }
        })
    }

    fn get_mut(&mut self, id: &TransferId) -> Option<&mut TransferRecord> {
        match self.made.get_mut(id) {
            Some(record) => Some(record),
            None if self.loaded_id_max.may_hold(id.0) => self.loaded.get_mut(id),
            None => None,
        }
    }

    /// Puts in a record not made here (loaded, or a hold handed over with the made ones).
    fn load(&mut self, record: TransferRecord) {
        self.loaded_id_max.note(record.transfer.id.0);
        self.loaded.insert(record.transfer.id, record);
    }

    fn contains(&self, id: &TransferId) -> bool {
        self.get(id).is_some()
    }

    fn len(&self) -> usize {
        self.made.len() + self.loaded.len()
    }

    fn push(&mut self, record: TransferRecord) {
        assert!(
            !self.loaded.contains_key(&record.transfer.id),
            "a transfer id is recorded once"
        );
        self.made.push(record);
    }

    fn pop(&mut self, id: TransferId) {
        self.made.pop(id);
    }
}

/// Whether a batch's transfers leave records in the ledger.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Records {
    Kept,
    Unkept,
}

/// Undo information for a linked chain in progress.
#[derive(Default)]
struct Undo {
    accounts: Vec<Account>,
    holds: Vec<(TransferId, HoldState)>,
    created: Vec<TransferId>,
    /// How many hold changes were listed when the chain began.
    hold_changes: usize,
}

/// The largest total an account may reach, in micro-units: `i64::MAX` (9.2 trillion units), so
/// that every total fits a signed 64-bit column in any SQL database and a copy between storage
/// backends can never fail on size.
pub const TOTAL_MICROS_MAX: u64 = i64::MAX as u64;

/// `total + amount`, or `Overflow` beyond [`TOTAL_MICROS_MAX`].
fn add_total(total: u64, amount: u64) -> Result<u64, TransferRejection> {
    total
        .checked_add(amount)
        .filter(|sum| *sum <= TOTAL_MICROS_MAX)
        .ok_or(TransferRejection::Overflow)
}

/// Transfers per batch: the largest batch one `apply` takes.
pub const TRANSFERS_PER_BATCH_MAX: usize = 8_190;

impl Ledger {
    pub fn new() -> Ledger {
        Ledger::default()
    }

    pub fn account(&self, id: AccountId) -> Option<&Account> {
        self.accounts.get(&id)
    }

    pub fn accounts(&self) -> impl Iterator<Item = &Account> {
        self.accounts.values()
    }

    pub fn account_count(&self) -> usize {
        self.accounts.len()
    }

    pub fn transfer(&self, id: TransferId) -> Option<&TransferRecord> {
        self.transfers.get(&id)
    }

    /// How many transfer records the ledger holds, made here or loaded.
    pub fn transfer_count(&self) -> usize {
        self.transfers.len()
    }

    /// The transfer records made here, in the order they were made (a failed chain's records
    /// are removed again, so a batch's records follow those of earlier batches). The records
    /// from position `n` on are those made since this list held `n`. Loaded records are not
    /// in it.
    pub fn transfer_records(&self) -> &[TransferRecord] {
        self.transfers.made.as_slice()
    }

    /// Every transfer record held, made here or loaded, in no particular order.
    pub fn all_transfer_records(&self) -> impl Iterator<Item = &TransferRecord> {
        self.transfers
            .made
            .as_slice()
            .iter()
            .chain(self.transfers.loaded.values())
    }

    /// Hands over the records made here: for a cache that writes them to storage. The ledger
    /// then holds only the pending holds among them (as loaded records: they may still be
    /// posted, voided or expire), and a transfer reusing another of their ids must have it
    /// loaded again first.
    pub fn take_made_transfers(&mut self) -> TransferRecords {
        let made = std::mem::take(&mut self.transfers.made);
        for record in made.as_slice() {
            if record.hold == Some(HoldState::Pending) {
                self.transfers.load(*record);
            }
        }
        made
    }

    /// The records of holds whose state changed since the last call, as they are now: for a
    /// store that wrote them when they were made, and must write their new state.
    /// Keeps the holds whose state changes from here on, for [`Ledger::take_hold_changes`].
    pub fn track_hold_changes(&mut self) {
        self.tracks_hold_changes = true;
    }

    fn note_hold_change(&mut self, id: TransferId) {
        if self.tracks_hold_changes {
            self.hold_changes.push(id);
        }
    }

    pub fn take_hold_changes(&mut self) -> Vec<TransferRecord> {
        let mut ids = std::mem::take(&mut self.hold_changes);
        ids.sort_unstable();
        ids.dedup();
        ids.iter()
            .filter_map(|id| self.transfers.get(id).copied())
            .collect()
    }

    /// Forgets the loaded transfer records that are not pending holds: for a cache whose
    /// storage holds them. Holds whose state changed since [`Ledger::take_hold_changes`] stay
    /// until it hands them over: storage holds them as they were.
    pub fn forget_loaded_transfers(&mut self) {
        let changed: std::collections::HashSet<TransferId, IdHashBuilder> =
            self.hold_changes.iter().copied().collect();
        self.transfers
            .loaded
            .retain(|id, record| record.hold == Some(HoldState::Pending) || changed.contains(id));
    }

    /// Forgets every account `keep` does not name: for a cache whose storage holds their
    /// totals ([`ShardedMap::retain_and_fit`]).
    pub fn forget_accounts_except(&mut self, keep: impl FnMut(&AccountId) -> bool) {
        self.forget_accounts_in(0..crate::map::SHARDS, keep);
    }

    /// [`Ledger::forget_accounts_except`] among the accounts of `shards` (of
    /// [`crate::SHARDS`]) only: a cache lets accounts go a few shards at a time.
    pub fn forget_accounts_in(
        &mut self,
        shards: std::ops::Range<usize>,
        mut keep: impl FnMut(&AccountId) -> bool,
    ) {
        self.accounts
            .retain_and_fit_shards(shards, |id, _| keep(id));
    }

    /// Puts an account loaded from storage, with its totals, into the ledger: for a working
    /// set that holds only the accounts a batch touches. Not a way to change totals: an
    /// account already held is refused unless it is the same, totals included.
    pub fn insert_account(&mut self, account: Account) -> Result<(), AccountRejection> {
        if account.id.0 == 0 {
            return Err(AccountRejection::IdMustNotBeZero);
        }
        match self.accounts.get(&account.id) {
            Some(existing) if *existing == account => Ok(()),
            Some(_) => Err(AccountRejection::ExistsWithDifferentFields),
            None => {
                self.accounts.insert(account.id, account);
                Ok(())
            }
        }
    }

    /// Puts a transfer record loaded from storage into the ledger, so that a transfer reusing
    /// its id gets the answer it would get from the whole ledger. A pending hold with a
    /// deadline is scheduled to expire, so its two accounts must be loaded too. A record whose
    /// id is already held is refused unless it is the same.
    pub fn insert_transfer_record(
        &mut self,
        record: TransferRecord,
    ) -> Result<(), TransferRejection> {
        let id = record.transfer.id;
        if id.0 == 0 {
            return Err(TransferRejection::IdMustNotBeZero);
        }
        if let Some(existing) = self.transfers.get(&id) {
            return if *existing == record {
                Ok(())
            } else {
                Err(TransferRejection::ExistsWithDifferentFields)
            };
        }
        if record.hold == Some(HoldState::Pending)
            && let Some(deadline) = record.expires_at
        {
            self.expiries.insert((deadline, id), ());
        }
        self.transfers.load(record);
        Ok(())
    }

    /// Puts a transfer record brought from another ledger (an import) among the records made
    /// here, without moving money: the imported totals hold what it moved, pending amounts
    /// included. Checked by the caller: the id must be new, and a pending hold must have no
    /// deadline of its own (holds with one expire by the ledger's clock, which an import
    /// does not carry).
    pub fn put_imported_transfer_record(&mut self, record: TransferRecord) {
        assert!(
            record.transfer.id.0 != 0 && !self.transfers.contains(&record.transfer.id),
            "an imported transfer record has a new id"
        );
        assert!(
            record.hold != Some(HoldState::Pending) || record.expires_at.is_none(),
            "an imported hold has no deadline"
        );
        self.transfers.push(record);
    }

    /// Creates an account. Creating the same account again is a no-op that succeeds.
    pub fn create_account(
        &mut self,
        id: AccountId,
        kind: AccountKind,
        currency: Currency,
    ) -> Result<(), AccountRejection> {
        if id.0 == 0 {
            return Err(AccountRejection::IdMustNotBeZero);
        }
        match self.accounts.get(&id) {
            Some(existing) if existing.kind == kind && existing.currency == currency => Ok(()),
            Some(_) => Err(AccountRejection::ExistsWithDifferentFields),
            None => {
                self.accounts.insert(id, Account::new(id, kind, currency));
                Ok(())
            }
        }
    }

    /// Applies a batch in order and returns one outcome per transfer.
    ///
    /// Holds whose deadline is at or before `now` expire first. A transfer whose id was seen
    /// before, in an earlier batch or earlier in this one, gets the outcome the id got then (or
    /// `ExistsWithDifferentFields`), and changes nothing.
    pub fn apply(
        &mut self,
        now: Timestamp,
        batch: &[Transfer],
    ) -> Vec<Result<(), TransferRejection>> {
        self.apply_keeping(now, batch, Records::Kept)
    }

    /// Applies posted transfers as [`Ledger::apply`] does, but keeps no record of them, made or
    /// failed: the caller keeps what they moved (a payment's row says which accounts, how much
    /// and when) and answers for their ids, which the ledger then cannot hold against a later
    /// transfer. An id the ledger holds is still refused as in `apply`. A payment's two legs go
    /// this way: a record of each would make a payment three rows in memory and on disk
    /// instead of one.
    pub fn apply_unrecorded(
        &mut self,
        now: Timestamp,
        batch: &[Transfer],
    ) -> Vec<Result<(), TransferRejection>> {
        assert!(
            batch
                .iter()
                .all(|transfer| transfer.kind == TransferKind::Posted),
            "only posted transfers go unrecorded: a hold is found again by its record"
        );
        self.apply_keeping(now, batch, Records::Unkept)
    }

    fn apply_keeping(
        &mut self,
        now: Timestamp,
        batch: &[Transfer],
        records: Records,
    ) -> Vec<Result<(), TransferRejection>> {
        assert!(batch.len() <= TRANSFERS_PER_BATCH_MAX, "batch too large");
        self.expire_holds(now);
        let mut outcomes = Vec::with_capacity(batch.len());
        let mut chain_start: Option<usize> = None;
        let mut undo = Undo::default();
        let mut chain_failed = false;
        for (index, transfer) in batch.iter().enumerate() {
            if transfer.linked && chain_start.is_none() {
                chain_start = Some(index);
                chain_failed = false;
                undo.accounts.clear();
                undo.holds.clear();
                undo.created.clear();
                undo.hold_changes = self.hold_changes.len();
            }
            let in_chain = chain_start.is_some();
            let chain_open_at_end = transfer.linked && index + 1 == batch.len();
            let outcome = if chain_failed {
                Err(TransferRejection::LinkedEventFailed)
            } else if chain_open_at_end {
                Err(TransferRejection::LinkedEventChainOpen)
            } else {
                self.apply_one(
                    now,
                    transfer,
                    if in_chain { Some(&mut undo) } else { None },
                    records,
                )
            };
            if outcome.is_err() && in_chain && !chain_failed {
                chain_failed = true;
                let start = chain_start.expect("in a chain");
                self.roll_back(&mut undo);
                for earlier in &mut outcomes[start..index] {
                    *earlier = Err(TransferRejection::LinkedEventFailed);
                }
                for (earlier, outcome) in batch[start..index].iter().zip(&outcomes[start..index]) {
                    self.record_failure(now, earlier, *outcome, records);
                }
            }
            // A failure is final as soon as it is known (a chain's members succeed only once
            // the chain closes), so record it now: a later transfer of this batch with the same
            // id is then a retry of a failed id, like in any later batch.
            self.record_failure(now, transfer, outcome, records);
            outcomes.push(outcome);
            if !transfer.linked && in_chain {
                chain_start = None;
                // The chain is over: what follows is judged on its own.
                chain_failed = false;
            }
        }
        outcomes
    }

    /// Records a failed transfer so that its id stays failed. A retry of a known id keeps the
    /// id's first record; id zero and `ExistsWithDifferentFields` (whose id belongs to another
    /// transfer) are not recorded.
    fn record_failure(
        &mut self,
        now: Timestamp,
        transfer: &Transfer,
        outcome: Result<(), TransferRejection>,
        records: Records,
    ) {
        if let Err(rejection) = outcome
            && records == Records::Kept
            && transfer.id.0 != 0
            && rejection != TransferRejection::ExistsWithDifferentFields
            && !self.transfers.contains(&transfer.id)
        {
            self.transfers.push(TransferRecord {
                transfer: *transfer,
                timestamp: now,
                outcome: Err(rejection),
                hold: None,
                expires_at: None,
            });
        }
    }

    fn apply_one(
        &mut self,
        now: Timestamp,
        transfer: &Transfer,
        undo: Option<&mut Undo>,
        records: Records,
    ) -> Result<(), TransferRejection> {
        use TransferRejection::*;
        if transfer.id.0 == 0 {
            return Err(IdMustNotBeZero);
        }
        if let Some(existing) = self.transfers.get(&transfer.id) {
            return if existing.transfer == *transfer {
                existing.outcome
            } else {
                Err(ExistsWithDifferentFields)
            };
        }
        // Posts and voids take their accounts and amount from the hold.
        let (debit_id, credit_id, amount, pending) = match transfer.kind {
            TransferKind::Posted | TransferKind::Pending { .. } => {
                if transfer.debit == transfer.credit {
                    return Err(AccountsMustBeDifferent);
                }
                if transfer.amount.is_zero() {
                    return Err(AmountMustNotBeZero);
                }
                (
                    transfer.debit,
                    transfer.credit,
                    transfer.amount.micros(),
                    None,
                )
            }
            TransferKind::PostPending { pending_id } | TransferKind::VoidPending { pending_id } => {
                let hold = self.pending_hold(pending_id)?;
                if transfer.debit != hold.transfer.debit || transfer.credit != hold.transfer.credit
                {
                    return Err(PendingTransferHasDifferentAccounts);
                }
                let held = hold.transfer.amount.micros();
                let amount = match transfer.kind {
                    TransferKind::PostPending { .. } if transfer.amount.is_zero() => held,
                    TransferKind::PostPending { .. } => transfer.amount.micros(),
                    _ => held,
                };
                if amount > held {
                    return Err(ExceedsPendingAmount);
                }
                (
                    hold.transfer.debit,
                    hold.transfer.credit,
                    amount,
                    Some((pending_id, held)),
                )
            }
        };
        let [debit, credit] = match self.accounts.get_disjoint_mut([&debit_id, &credit_id]) {
            [Some(debit), Some(credit)] => [debit, credit],
            [None, _] => return Err(DebitAccountNotFound),
            [_, None] => return Err(CreditAccountNotFound),
        };
        if debit.currency != credit.currency {
            return Err(CurrenciesMustMatch);
        }
        let (new_debit, new_credit) = match (transfer.kind, pending) {
            (TransferKind::Posted, _) => {
                let mut d = *debit;
                let mut c = *credit;
                d.debits_posted = add_total(d.debits_posted, amount)?;
                c.credits_posted = add_total(c.credits_posted, amount)?;
                (d, c)
            }
            (TransferKind::Pending { .. }, _) => {
                let mut d = *debit;
                let mut c = *credit;
                d.debits_pending = add_total(d.debits_pending, amount)?;
                c.credits_pending = add_total(c.credits_pending, amount)?;
                (d, c)
            }
            (TransferKind::PostPending { .. }, Some((_, held))) => {
                let mut d = *debit;
                let mut c = *credit;
                d.debits_pending -= held;
                c.credits_pending -= held;
                d.debits_posted = add_total(d.debits_posted, amount)?;
                c.credits_posted = add_total(c.credits_posted, amount)?;
                (d, c)
            }
            (TransferKind::VoidPending { .. }, Some((_, held))) => {
                let mut d = *debit;
                let mut c = *credit;
                d.debits_pending -= held;
                c.credits_pending -= held;
                (d, c)
            }
            _ => unreachable!("posts and voids always resolve a hold"),
        };
        if new_debit.kind.debits_must_not_exceed_credits() && new_debit.available() < 0 {
            return Err(ExceedsAvailableBalance);
        }
        if let Some(undo) = undo {
            undo.accounts.push(*debit);
            undo.accounts.push(*credit);
            if let Some((pending_id, _)) = pending {
                undo.holds.push((pending_id, HoldState::Pending));
            }
            if records == Records::Kept {
                undo.created.push(transfer.id);
            }
        }
        *debit = new_debit;
        *credit = new_credit;
        let (hold, expires_at) = match transfer.kind {
            TransferKind::Pending { timeout_secs } => {
                let expires_at =
                    (timeout_secs > 0).then(|| now.saturating_add_secs(u64::from(timeout_secs)));
                if let Some(deadline) = expires_at {
                    self.expiries.insert((deadline, transfer.id), ());
                }
                (Some(HoldState::Pending), expires_at)
            }
            _ => (None, None),
        };
        if let Some((pending_id, _)) = pending {
            let resolved = match transfer.kind {
                TransferKind::PostPending { .. } => HoldState::Posted,
                _ => HoldState::Voided,
            };
            self.transfers
                .get_mut(&pending_id)
                .expect("hold checked above")
                .hold = Some(resolved);
            self.note_hold_change(pending_id);
        }
        if records == Records::Kept {
            self.transfers.push(TransferRecord {
                transfer: *transfer,
                timestamp: now,
                outcome: Ok(()),
                hold,
                expires_at,
            });
        }
        Ok(())
    }

    /// Expires hold `pending_id` now, whatever its own deadline: its amount is released as a
    /// void releases it, and it is marked expired, with no transfer of its own (so no id that
    /// another transfer could have taken first). For holds whose deadline is kept outside the
    /// ledger. Refused, changing nothing, as a void of the same hold would be: a hold that is
    /// not found, or no longer pending, or whose accounts are not held.
    pub fn expire_pending(&mut self, pending_id: TransferId) -> Result<(), TransferRejection> {
        use TransferRejection::*;
        let hold = self.pending_hold(pending_id)?;
        let (debit_id, credit_id, amount) = (
            hold.transfer.debit,
            hold.transfer.credit,
            hold.transfer.amount.micros(),
        );
        let [debit, credit] = match self.accounts.get_disjoint_mut([&debit_id, &credit_id]) {
            [Some(debit), Some(credit)] => [debit, credit],
            [None, _] => return Err(DebitAccountNotFound),
            [_, None] => return Err(CreditAccountNotFound),
        };
        debit.debits_pending -= amount;
        credit.credits_pending -= amount;
        self.transfers
            .get_mut(&pending_id)
            .expect("found above")
            .hold = Some(HoldState::Expired);
        self.note_hold_change(pending_id);
        Ok(())
    }

    /// The applied pending transfer `pending_id`, if its hold is still pending; else why a
    /// post, void or expiry of it is refused.
    fn pending_hold(&self, pending_id: TransferId) -> Result<&TransferRecord, TransferRejection> {
        use TransferRejection::*;
        let hold = match self.transfers.get(&pending_id) {
            Some(record)
                if record.outcome.is_ok()
                    && matches!(record.transfer.kind, TransferKind::Pending { .. }) =>
            {
                record
            }
            _ => return Err(PendingTransferNotFound),
        };
        match hold.hold {
            Some(HoldState::Pending) => Ok(hold),
            Some(HoldState::Posted) => Err(PendingTransferAlreadyPosted),
            Some(HoldState::Voided) => Err(PendingTransferAlreadyVoided),
            Some(HoldState::Expired) | None => Err(PendingTransferExpired),
        }
    }

    /// Undoes the applied part of a failed chain, newest first.
    fn roll_back(&mut self, undo: &mut Undo) {
        for account in undo.accounts.drain(..).rev() {
            self.accounts.insert(account.id, account);
        }
        for (pending_id, state) in undo.holds.drain(..).rev() {
            if let Some(record) = self.transfers.get_mut(&pending_id) {
                record.hold = Some(state);
            }
        }
        // The holds are as they were before the chain: so is the list of those changed.
        self.hold_changes.truncate(undo.hold_changes);
        // Only what this chain created is removed: a retried id keeps its first record. The
        // chain's records are the newest ones, since a failure ends the chain at once.
        for id in undo.created.drain(..).rev() {
            self.transfers.pop(id);
        }
    }

    /// Voids every hold whose deadline is at or before `now`.
    fn expire_holds(&mut self, now: Timestamp) {
        while let Some((&(deadline, id), _)) = self.expiries.first_key_value() {
            if deadline > now {
                break;
            }
            self.expiries.pop_first();
            let Some(record) = self.transfers.get_mut(&id) else {
                continue;
            };
            if record.hold != Some(HoldState::Pending) || record.expires_at != Some(deadline) {
                continue;
            }
            record.hold = Some(HoldState::Expired);
            let (debit_id, credit_id, amount) = (
                record.transfer.debit,
                record.transfer.credit,
                record.transfer.amount.micros(),
            );
            self.note_hold_change(id);
            let [Some(debit), Some(credit)] =
                self.accounts.get_disjoint_mut([&debit_id, &credit_id])
            else {
                panic!("a hold's accounts exist");
            };
            debit.debits_pending -= amount;
            credit.credits_pending -= amount;
        }
    }
}
