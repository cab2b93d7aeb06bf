//! A state as a cache over its disk (ADR 0004): memory holds what was made since the last
//! checkpoint and what recent records read; the rest is on disk, written by checkpoints.
//!
//! The cycle, all driven by the one writer:
//!
//! 1. Before applying records, [`State::fetch`] reads from disk what [`State::needs`] lists
//!    and memory lacks (under the read lock), and [`State::load_fetched`] puts it in (under the
//!    write lock). Applying then finds everything in memory, as in a whole state.
//! 2. [`State::freeze`] starts a checkpoint: the young history becomes the frozen generation
//!    (a move, not a copy) and the state rows changed since the last one are copied out.
//! 3. The store writes the [`Checkpoint`] to disk, away from the lock, while the state goes on
//!    applying records and answering reads, the frozen rows still among them.
//! 4. [`State::checkpoint_written`] lets the frozen generation go, and
//!    [`State::forget_unchanged`] lets memory shrink: rows not changed since the checkpoint
//!    began are on disk.

use std::collections::HashSet;
use std::sync::Arc;

use farthing_kernel::Slot;
use farthing_ledger::{Timestamp, TransferRecord};

use super::queries::{read_history, read_state};
use super::{Cache, State, account_id};
use crate::disk::{
    self, Disk, DiskError, GLOBALS_KEY, Globals, KeyOwner, MerchantState, PayerState, StateChanges,
    history_kind,
};
use crate::history::{Generation, Line, PaymentRow, RefundRow, Refunded, TopupRow};
use crate::ids::{PayerId, PaymentId};
use crate::model::*;
use crate::working_set::{LoadError, Needs};
use farthing_ledger::{AccountId, Currency, IdHashBuilder};

/// Rounds of loading at most: a refund names its payment, whose row names its accounts.
pub const LOAD_ROUNDS_MAX: usize = 4;

/// The shards each of a cache's tables is kept in: [`State::forget_unused_in`] lets rows go a
/// range of them at a time.
pub const CACHE_SHARDS: usize = farthing_ledger::SHARDS;

/// What a cache read from its disk for a batch: the rows memory lacked.
#[derive(Default, Debug)]
pub struct Fetched {
    keys: Vec<(KeyHash, Principal)>,
    merchants: Vec<MerchantState>,
    payers: Vec<PayerState>,
    accounts: Vec<AccountRow>,
    payments: Vec<PaymentRow>,
    refunded: Vec<(PaymentId, Refunded)>,
    /// State rows of registered kinds: tag, id, and the stored row if there is one.
    rows: Vec<(u8, u128, Option<Vec<u8>>)>,
    topups: Vec<TopupRow>,
    refunds: Vec<RefundRow>,
    lines: Vec<(EntryObject, Line)>,
    transfers: Vec<TransferRecord>,
    idempotency: Vec<IdempotencyRow>,
}

impl Fetched {
    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
            && self.merchants.is_empty()
            && self.payers.is_empty()
            && self.accounts.is_empty()
            && self.payments.is_empty()
            && self.refunded.is_empty()
            && self.rows.is_empty()
            && self.topups.is_empty()
            && self.refunds.is_empty()
            && self.lines.is_empty()
            && self.transfers.is_empty()
            && self.idempotency.is_empty()
    }
}

/// One checkpoint: the history made since the last one, and the state rows changed since,
/// as they stood at `position`.
pub struct Checkpoint {
    /// Records applied when the checkpoint began: the journal position it reflects.
    pub position: u64,
    history: Arc<Generation>,
    accounts: Vec<AccountRow>,
    merchants: Vec<MerchantState>,
    payers: Vec<PayerState>,
    keys: Vec<(KeyHash, Option<Principal>)>,
    refunded: Vec<(PaymentId, Refunded)>,
    /// State rows of registered kinds changed, each with whether it is pinned.
    rows: Vec<(StoredRow, bool)>,
    /// Records of holds settled since their history rows were written.
    transfers_resolved: Vec<TransferRecord>,
    idempotency: Vec<IdempotencyRow>,
    /// Idempotency keys made before this are to be removed from disk.
    pub prune_before: Option<Timestamp>,
    globals: Globals,
}

/// Rows copied for the next checkpoint, a writer's round at a time ([`State::stage_changes`]).
/// A row changed in several rounds is here once for each, in the order copied; the disk keeps
/// the last.
#[derive(Default)]
pub(crate) struct Staged {
    accounts: Vec<AccountRow>,
    payers: Vec<PayerState>,
}

/// Accounts the set of those changed since the last stage keeps room for, whatever it held.
const STAGED_ACCOUNTS_ROOM: usize = 4_096;

impl Checkpoint {
    /// History rows made since the last checkpoint.
    pub fn history_len(&self) -> usize {
        self.history.rows()
    }

    /// The history rows in key order, each encoded only when it is reached: a checkpoint
    /// holds a sorted list of keys (25 bytes a row), never every row encoded at once.
    pub fn history_in_key_order(&self) -> impl Iterator<Item = ([u8; 17], Vec<u8>)> + '_ {
        #[derive(Clone, Copy)]
        enum Row {
            Payment(usize),
            Topup(crate::ids::TopupId),
            Refund(crate::ids::RefundId),
            Line(EntryObject),
            Transfer(usize),
        }
        let history = &self.history;
        let mut keys: Vec<([u8; 17], Row)> = Vec::with_capacity(history.rows());
        keys.extend(history.payments.iter().enumerate().map(|(at, row)| {
            (
                disk::history_key(row.payment.id.to_u128(), history_kind::PAYMENT),
                Row::Payment(at),
            )
        }));
        keys.extend(history.topups.keys().map(|id| {
            (
                disk::history_key(id.to_u128(), history_kind::TOPUP),
                Row::Topup(*id),
            )
        }));
        keys.extend(history.refunds.keys().map(|id| {
            (
                disk::history_key(id.to_u128(), history_kind::REFUND),
                Row::Refund(*id),
            )
        }));
        keys.extend(
            history
                .lines
                .keys()
                .map(|object| (disk::line_key(*object), Row::Line(*object))),
        );
        keys.extend(
            history
                .transfers
                .as_slice()
                .iter()
                .enumerate()
                .map(|(at, record)| (disk::transfer_key(record.transfer.id), Row::Transfer(at))),
        );
        keys.sort_unstable_by_key(|entry| entry.0);
        keys.into_iter().map(move |(key, row)| {
            let value = match row {
                Row::Payment(at) => disk::encode(&history.payments[at]),
                Row::Topup(id) => disk::encode(&history.topups[&id]),
                Row::Refund(id) => disk::encode(&history.refunds[&id]),
                Row::Line(object) => disk::encode(&history.lines[&object]),
                Row::Transfer(at) => disk::encode(&history.transfers.as_slice()[at]),
            };
            (key, value)
        })
    }

    /// Puts the state rows changed into `out`, the globals last.
    pub fn state_changes(&self, out: &mut StateChanges) {
        for row in &self.accounts {
            out.put_row(&disk::account_key(row.account.id), row);
        }
        for row in &self.merchants {
            out.put_row(&disk::merchant_key(row.merchant.id), row);
        }
        for row in &self.payers {
            out.put_row(&disk::payer_key(row.payer.id), row);
        }
        out.put(disk::FORMAT_KEY, &disk::format_value());
        for (key_hash, principal) in &self.keys {
            let key = disk::key_key(key_hash);
            match principal {
                Some(principal) => out.put_row(&key, &KeyOwner(*principal)),
                None => out.remove(&key),
            }
        }
        for (id, refunded) in &self.refunded {
            out.put_row(&disk::refunded_key(*id), refunded);
        }
        for (row, pinned) in &self.rows {
            out.put(&disk::row_key(row.tag, row.id), &row.bytes);
            let marker = disk::pinned_key(row.tag, row.id);
            if *pinned {
                out.put(&marker, &[]);
            } else {
                out.remove(&marker);
            }
        }
        for record in &self.transfers_resolved {
            out.put_row(&disk::transfer_state_key(record.transfer.id), record);
        }
        for row in &self.idempotency {
            out.put_row(&disk::idempotency_key(&row.key), row);
            out.put(&disk::idempotency_by_time_key(row.made, &row.key), &[]);
        }
        out.put_row(GLOBALS_KEY, &self.globals);
    }
}

/// A copy of `payer`'s row as it stands: the payer, its lists, and each account it lists.
fn payer_row(
    held: &crate::parties::Parties,
    ledger: &farthing_ledger::Ledger,
    disk: &dyn Disk,
    payer: PayerId,
    lists: &disk::PartyLists,
) -> PayerState {
    PayerState {
        payer: held.payer_shared(payer).expect("a changed payer is held"),
        lists: lists.clone(),
        accounts: lists
            .accounts
            .iter()
            .map(|(_, account)| match ledger.account(*account) {
                Some(account) => *account,
                None => unchanged_account(disk, payer, *account),
            })
            .collect(),
    }
}

/// An account of `payer` that memory does not hold: unchanged since the last checkpoint
/// written, whose row for the payer holds it. A payer's account and its row go from memory
/// each in their turn, so a payer paying in one currency may hold its row while another
/// currency's account has gone: read then, under the lock, and only then.
fn unchanged_account(disk: &dyn Disk, payer: PayerId, id: AccountId) -> farthing_ledger::Account {
    let row = read_state::<PayerState>(disk, &disk::payer_key(payer))
        .unwrap_or_else(|error| panic!("payer {payer}'s row cannot be read: {error}"))
        .unwrap_or_else(|| panic!("payer {payer} holds account {} but has no row", id.0));
    row.accounts
        .into_iter()
        .find(|account| account.id == id)
        .unwrap_or_else(|| panic!("payer {payer}'s row lacks its account {}", id.0))
}

impl State {
    /// Loads a state row of a registered kind read from disk (`None`: there is none).
    pub(crate) fn load_row(
        &mut self,
        tag: u8,
        id: u128,
        bytes: Option<&[u8]>,
    ) -> Result<(), DiskError> {
        let rows = self
            .kinds
            .tag_mut(tag)
            .ok_or_else(|| DiskError(format!("a row of unknown kind {tag}")))?;
        match rows.load_stored(id, bytes) {
            Ok(true) => Ok(()),
            Ok(false) => Err(DiskError(format!("the row {tag}/{id} was loaded twice"))),
            Err(error) => Err(DiskError(format!(
                "the row {tag}/{id} does not decode: {error}"
            ))),
        }
    }

    /// A cache over `disk`, standing where the disk's last checkpoint left it: replay the
    /// journal from [`State::records_applied`] on.
    pub fn cache_over(disk: Arc<dyn Disk>) -> Result<State, DiskError> {
        if disk::needs_upgrade(&*disk)? {
            return Err(DiskError(format!(
                "the state on disk is in an earlier format: opening the store brings it to format {}",
                disk::STATE_FORMAT
            )));
        }
        let globals: Globals = read_state(&*disk, GLOBALS_KEY)?.unwrap_or_default();
        let mut state = State::new();
        state.track_changes();
        // A cache writes its own rows back; a working set's record of what it made is not
        // needed.
        state.tracker = None;
        state.records_applied = globals.records_applied;
        state.last_time = globals.last_time;
        state.newest_payment = globals.newest_payment;
        state.merchants = globals.merchants;
        state.payers = globals.payers;
        state.payments_before = globals.payments;
        state.transfers_before = globals.transfers;
        state.idempotency.set_pruned_before(globals.pruned_before);
        if let Some(key_hash) = globals.operator_key {
            state
                .parties
                .load_key(key_hash, Principal::Operator)
                .map_err(|error| DiskError(format!("the operator key does not load: {error:?}")))?;
        }
        // Every pinned row (a live hold), so that what sweeps them sees each one: as many as
        // are pinned, not history.
        for entry in disk.scan_state(&[crate::kinds::PINNED]) {
            let (key, _) = entry?;
            let (tag, id) = disk::pinned_of(&key).ok_or_else(|| {
                DiskError("a pinned row's key is not a tag and an id".to_string())
            })?;
            let bytes = disk
                .state(&disk::row_key(tag, id))?
                .ok_or_else(|| DiskError(format!("the pinned row {tag}/{id} is missing")))?;
            state.load_row(tag, id, Some(&bytes))?;
        }
        state.cache = Some(Box::new(Cache {
            disk,
            accounts_changed: HashSet::default(),
            accounts_unstaged: HashSet::default(),
            accounts_staged: 0,
            accounts_again: 0,
            staged: Staged::default(),
            id_max: 0,
            evictions: 0,
        }));
        Ok(state)
    }

    /// How many times rows have left memory: a checkpoint written (its history is read from
    /// disk from then on), unchanged rows forgotten, idempotency keys pruned. While it stays
    /// the same, what memory held still is, so rows read for a record ahead of it need not be
    /// looked for again. 0 for a state that is not a cache.
    pub fn evictions(&self) -> u64 {
        self.cache.as_ref().map_or(0, |cache| cache.evictions)
    }

    pub(super) fn count_eviction(&mut self) {
        if let Some(cache) = &mut self.cache {
            cache.evictions += 1;
        }
    }

    /// Whether this state is a cache over a disk.
    pub fn is_cache(&self) -> bool {
        self.cache.is_some()
    }

    /// Reads from disk what applying records with these needs reads and memory lacks. A
    /// cache's writer asks under the read lock, then loads what came back under the write
    /// lock, and asks again while [`Needs::incomplete`] (a refund names its payment before
    /// the payment names its accounts). Empty for a state that is not a cache.
    fn fetch(&self, needs: &Needs) -> Result<Fetched, DiskError> {
        let mut fetched = Fetched::default();
        let Some(disk) = self.disk() else {
            return Ok(fetched);
        };
        // An id above every id of the frozen generation and of the disk is on neither: a new
        // id, as nearly every id is, costs one comparison.
        let older_id_max = disk
            .history_id_max()
            .max(self.frozen_history().map_or(0, |frozen| frozen.id_max));
        let older = |id: u128| id <= older_id_max;
        // Lists repeat (two payments of one payer); what is fetched is fetched once.
        let mut asked: HashSet<Vec<u8>> = HashSet::new();
        let mut first_time = |key: &[u8]| asked.insert(key.to_vec());
        for key_hash in &needs.key_hashes {
            let key = disk::key_key(key_hash);
            if self.parties.key_slot(key_hash).is_none()
                && first_time(&key)
                && let Some(owner) = read_state::<KeyOwner>(disk, &key)?
            {
                fetched.keys.push((*key_hash, owner.0));
            }
        }
        for id in &needs.merchants {
            if self.merchant_lists.get(id).is_none() {
                let key = disk::merchant_key(*id);
                if first_time(&key)
                    && let Some(row) = read_state::<MerchantState>(disk, &key)?
                {
                    fetched.merchants.push(row);
                }
            }
        }
        // A payer's row holds its lists and its accounts: read once for either, and what
        // memory lacks of it loaded, so that the payer of a changed account is held (staging
        // copies the account into the payer's row).
        for id in &needs.payers {
            if self.payer_lists.get(id).is_none() {
                self.fetch_payer(disk, *id, &mut first_time, &mut fetched)?;
            }
        }
        for &(owner, currency) in &needs.accounts {
            let id = account_id(owner, currency);
            match owner {
                Owner::Payer(payer) => {
                    if self.ledger.account(id).is_none() || !self.payer_lists.holds(&payer) {
                        self.fetch_payer(disk, payer, &mut first_time, &mut fetched)?;
                    }
                }
                _ => {
                    if self.ledger.account(id).is_none() {
                        let key = disk::account_key(id);
                        if first_time(&key)
                            && let Some(row) = read_state::<AccountRow>(disk, &key)?
                        {
                            fetched.accounts.push(row);
                        }
                    }
                }
            }
        }
        for id in &needs.payments {
            if !older(id.to_u128()) {
                continue;
            }
            if !first_time(&disk::history_key(id.to_u128(), history_kind::PAYMENT)) {
                continue;
            }
            // Whether the payment exists, and whether a row read now carries its line.
            let (exists, read_with_line) = match self.payment_row(*id) {
                Some(_) => (true, false),
                None => match read_history::<PaymentRow>(
                    Some(disk),
                    id.to_u128(),
                    history_kind::PAYMENT,
                )? {
                    Some(row) => {
                        let with_line = row.line.is_some();
                        fetched.payments.push(row);
                        (true, with_line)
                    }
                    None => (false, false),
                },
            };
            if exists
                && self.refunded.slot(id).is_none()
                && let Some(refunded) = read_state::<Refunded>(disk, &disk::refunded_key(*id))?
            {
                fetched.refunded.push((*id, refunded));
            }
            if exists && !read_with_line {
                self.fetch_line(disk, EntryObject::Payment(*id), &mut fetched)?;
            }
        }
        for id in &needs.topups {
            if older(id.to_u128())
                && first_time(&disk::history_key(id.to_u128(), history_kind::TOPUP))
                && self.topup_row(*id).is_none()
                && let Some(row) =
                    read_history::<TopupRow>(Some(disk), id.to_u128(), history_kind::TOPUP)?
            {
                let with_line = row.line.is_some();
                fetched.topups.push(row);
                if !with_line {
                    self.fetch_line(disk, EntryObject::Topup(*id), &mut fetched)?;
                }
            }
        }
        for id in &needs.refunds {
            if older(id.to_u128())
                && first_time(&disk::history_key(id.to_u128(), history_kind::REFUND))
                && self.refund_row(*id).is_none()
                && let Some(row) =
                    read_history::<RefundRow>(Some(disk), id.to_u128(), history_kind::REFUND)?
            {
                let with_line = row.line.is_some();
                fetched.refunds.push(row);
                if !with_line {
                    self.fetch_line(disk, EntryObject::Refund(*id), &mut fetched)?;
                }
            }
        }
        for id in needs.transfers.iter().chain(&needs.held_transfers) {
            if !older(id.0)
                || !first_time(&disk::transfer_key(*id))
                || self.ledger.transfer(*id).is_some()
            {
                continue;
            }
            let frozen = self
                .frozen_history()
                .and_then(|frozen| frozen.transfers.get(id).copied());
            let record = match frozen {
                Some(record) => Some(record),
                // A hold settled after its row was written has its record in the state.
                None => match read_state::<TransferRecord>(disk, &disk::transfer_state_key(*id))? {
                    Some(record) => Some(record),
                    None => {
                        read_history::<TransferRecord>(Some(disk), id.0, history_kind::TRANSFER)?
                    }
                },
            };
            fetched.transfers.extend(record);
        }
        for &(tag, id) in &needs.rows {
            let key = disk::row_key(tag, id);
            if self.kinds.tag(tag).is_some_and(|rows| !rows.knows(id)) && first_time(&key) {
                fetched.rows.push((tag, id, disk.state(&key)?));
            }
        }
        for key in &needs.idempotency_keys {
            if !self.idempotency.knows(key)
                && first_time(&disk::idempotency_key(key))
                && let Some(row) = read_state::<IdempotencyRow>(disk, &disk::idempotency_key(key))?
                && row.made >= self.idempotency.pruned_before()
            {
                fetched.idempotency.push(row);
            }
        }
        Ok(fetched)
    }

    /// Reads `payer`'s row, once a batch, and adds what memory lacks of it: the payer and its
    /// lists, and each of its accounts.
    fn fetch_payer(
        &self,
        disk: &dyn Disk,
        payer: PayerId,
        first_time: &mut impl FnMut(&[u8]) -> bool,
        fetched: &mut Fetched,
    ) -> Result<(), DiskError> {
        let key = disk::payer_key(payer);
        if !first_time(&key) {
            return Ok(());
        }
        let Some(row) = read_state::<PayerState>(disk, &key)? else {
            return Ok(());
        };
        fetched.accounts.extend(
            row.account_rows()
                .filter(|row| self.ledger.account(row.account.id).is_none()),
        );
        if !self.payer_lists.holds(&payer) {
            fetched.payers.push(row);
        }
        Ok(())
    }

    /// Adds the line an import brought for `object` as a row of its own, if memory lacks
    /// the object's line and the disk has one. For an object whose row (held, or just read)
    /// does not carry its line.
    fn fetch_line(
        &self,
        disk: &dyn Disk,
        object: EntryObject,
        fetched: &mut Fetched,
    ) -> Result<(), DiskError> {
        if self.line_held(object).is_some() {
            return Ok(());
        }
        if let Some(bytes) = disk.history(&disk::line_key(object))? {
            fetched.lines.push((object, disk::decode(&bytes)?));
        }
        Ok(())
    }

    /// Loads what applying `records` reads and memory lacks, in as many rounds as it takes
    /// (a refund names its payment, whose row names the accounts). Nothing for a state that
    /// is not a cache.
    pub fn load_for(&mut self, records: &[Record]) -> Result<(), DiskError> {
        for _ in 0..LOAD_ROUNDS_MAX {
            let fetched = self.fetch_for(
                records
                    .iter()
                    .map(|record| (record.idempotency.as_ref(), &record.command)),
            )?;
            if fetched.is_empty() {
                return Ok(());
            }
            self.load_fetched(fetched)?;
        }
        Ok(())
    }

    /// Reads from disk what these commands (with their idempotency claims) read and memory
    /// lacks: one round of [`State::load_for`], for a writer that reads under one lock and
    /// loads under another. Empty for a state that is not a cache.
    pub fn fetch_for<'a>(
        &self,
        commands: impl IntoIterator<Item = (Option<&'a IdempotencyClaim>, &'a Command)>,
    ) -> Result<Fetched, DiskError> {
        if !self.is_cache() {
            return Ok(Fetched::default());
        }
        let needs = self.needs_of_batch(commands);
        self.fetch(&needs)
    }

    /// Reads from disk what `needs` lists and memory lacks, as [`State::fetch_for`] does for
    /// commands: for a writer that reads what a large batch needs a part at a time
    /// ([`Needs::split`]) before the batch itself. Empty for a state that is not a cache.
    pub fn fetch_needs(&self, needs: &Needs) -> Result<Fetched, DiskError> {
        if !self.is_cache() {
            return Ok(Fetched::default());
        }
        self.fetch(needs)
    }

    /// Puts in what [`State::fetch_for`] read: loads, not changes. A row that does not fit what
    /// memory holds means the disk and the state disagree.
    pub fn load_fetched(&mut self, mut fetched: Fetched) -> Result<(), DiskError> {
        for (tag, id, bytes) in std::mem::take(&mut fetched.rows) {
            self.load_row(tag, id, bytes.as_deref())?;
        }
        self.load_fetched_rows(fetched)
            .map_err(|error| DiskError(format!("a row read from disk does not load: {error:?}")))
    }

    fn load_fetched_rows(&mut self, fetched: Fetched) -> Result<(), LoadError> {
        for (key_hash, principal) in fetched.keys {
            if principal != Principal::Operator {
                self.insert_key(key_hash, principal)?;
            }
        }
        for row in fetched.merchants {
            self.insert_merchant_with_lists(row.merchant, row.lists)?;
        }
        for row in fetched.payers {
            self.insert_payer_with_lists(row.payer, row.lists)?;
        }
        for row in fetched.accounts {
            self.insert_account_unlisted(row.owner, row.account)?;
        }
        for row in fetched.payments {
            if self.payment_row(row.payment.id).is_some() {
                return Err(LoadError::AlreadyLoaded);
            }
            self.loaded.push_payment(row);
        }
        for (id, refunded) in fetched.refunded {
            if !self.refunded.load(id, Slot::Present(refunded)) {
                return Err(LoadError::AlreadyLoaded);
            }
        }
        for row in fetched.topups {
            if self.topup_row(row.topup.id).is_some() {
                return Err(LoadError::AlreadyLoaded);
            }
            self.loaded.topups.insert(row.topup.id, row);
        }
        for row in fetched.refunds {
            if self.refund_row(row.refund.id).is_some() {
                return Err(LoadError::AlreadyLoaded);
            }
            self.loaded.refunds.insert(row.refund.id, row);
        }
        for (object, line) in fetched.lines {
            self.loaded.lines.insert(object, line);
        }
        for record in fetched.transfers {
            self.insert_transfer_record(record)?;
        }
        for row in fetched.idempotency {
            self.insert_idempotency_record(row)?;
        }
        Ok(())
    }

    /// Begins a checkpoint at the current position: the young history becomes the frozen
    /// generation, and the state rows changed since the last checkpoint are copied out. Cheap
    /// and bounded by what changed, never by history. The previous checkpoint must have been
    /// written ([`State::checkpoint_written`]).
    pub fn freeze(&mut self) -> Checkpoint {
        assert!(
            self.frozen.is_none(),
            "one checkpoint at a time: the last one is still being written"
        );
        self.stage_changes();
        let cache = self.cache.as_mut().expect("only a cache checkpoints");
        cache.accounts_changed.clear();
        (cache.accounts_staged, cache.accounts_again) = (0, 0);
        let Staged { accounts, payers } = std::mem::take(&mut cache.staged);
        let mut young = std::mem::take(&mut self.young);
        young.transfers = self.ledger.take_made_transfers();
        // A bound, not the largest id held: every id of the generation is at most it.
        young.id_max = cache.id_max;
        let history = Arc::new(young);
        self.payments_before += history.payments.len() as u64;
        self.transfers_before += history.transfers.len() as u64;

        let parties = self.parties.take_changes();
        // A new party's lists are put when it is made, so every party to write is among the
        // lists changed: one pass, one lookup of each.
        let held = &self.parties;
        let merchants = self
            .merchant_lists
            .take_changes_map(|id, lists| MerchantState {
                merchant: held
                    .merchant_shared(*id)
                    .expect("a changed merchant is held"),
                lists: match lists {
                    Slot::Present(lists) => lists.clone(),
                    Slot::Absent => unreachable!("lists are never removed"),
                },
            });
        // Staged above: the round ends with nothing left to copy.
        let unstaged = self.payer_lists.take_changes();
        debug_assert!(unstaged.is_empty(), "every payer's change was staged");
        let refunded = self
            .refunded
            .take_changes()
            .into_iter()
            .filter_map(|(id, slot)| match slot {
                Slot::Present(refunded) => Some((id, *refunded)),
                Slot::Absent => None,
            })
            .collect();
        let rows = self
            .kinds
            .all_mut()
            .flat_map(|rows| rows.take_changes())
            .collect();
        let transfers_resolved = self.ledger.take_hold_changes();
        let (idempotency, prunes) = self.idempotency.take_changes();
        let globals = Globals {
            records_applied: self.records_applied,
            last_time: self.last_time,
            newest_payment: self.newest_payment,
            operator_key: self.parties.operator_key(),
            pruned_before: self.idempotency.pruned_before(),
            merchants: self.merchants,
            payers: self.payers,
            payments: self.payments_before,
            transfers: self.transfers_before,
        };
        self.frozen = Some((self.records_applied, history.clone()));
        Checkpoint {
            position: self.records_applied,
            history,
            accounts,
            merchants,
            payers,
            keys: parties.keys,
            refunded,
            rows,
            transfers_resolved,
            idempotency,
            // The latest cut-off, not the last prune's: a prune may name an earlier time than
            // one before it, and what the earlier prune removed must go from disk too.
            prune_before: prunes.iter().max().copied(),
            globals,
        }
    }

    /// Copies the accounts and payers changed since the last copy for the next checkpoint. A
    /// writer calls it after a round that changed many ([`State::changes_unstaged`]), while
    /// they are still in the processor's cache; beginning a checkpoint then copies only what
    /// changed since, instead of every row changed since the last checkpoint, which for a
    /// million payers held the state lock for tens of milliseconds. A state that is not a
    /// cache copies nothing.
    pub fn stage_changes(&mut self) {
        let Some(cache) = self.cache.as_mut() else {
            return;
        };
        let (ledger, owners) = (&self.ledger, &self.owners);
        let unstaged = cache.accounts_unstaged.len();
        cache.accounts_staged += unstaged;
        // A payer's accounts are written in its row: a changed one makes its payer's row a
        // change (a payer whose account changes is held: loading either loads both).
        let payer_lists = &mut self.payer_lists;
        cache
            .staged
            .accounts
            .extend(cache.accounts_unstaged.drain().filter_map(|id| {
                let owner = owners.get(&id)?.owner();
                if let Owner::Payer(payer) = owner {
                    payer_lists
                        .update(&payer, |_| ())
                        .expect("the payer of a changed account is held");
                    return None;
                }
                let account = *ledger.account(id)?;
                Some(AccountRow { owner, account })
            }));
        // Draining visits every bucket: a set grown by one large round (a replay, a set-up)
        // would cost each small commit after it that much again.
        let room = unstaged.max(STAGED_ACCOUNTS_ROOM);
        if cache.accounts_unstaged.capacity() > 4 * room {
            cache.accounts_unstaged.shrink_to(room);
        }
        let held = &self.parties;
        let disk = &*cache.disk;
        self.payer_lists
            .stage_changes_map(&mut cache.staged.payers, |id, lists| {
                let Slot::Present(lists) = lists else {
                    unreachable!("lists are never removed")
                };
                payer_row(held, ledger, disk, *id, lists)
            });
    }

    /// Copies `payer`'s row for the next checkpoint right after a command changed it, while
    /// the payer, its lists and its accounts are in the processor's cache: a stage of one row
    /// ([`State::stage_changes`] copies the rest), and only while staging pays. For a state
    /// that is not a cache, nothing.
    pub(crate) fn stage_payer(&mut self, payer: PayerId) {
        if !self.staging_pays() {
            return;
        }
        let Some(cache) = self.cache.as_mut() else {
            return;
        };
        let (held, ledger) = (&self.parties, &self.ledger);
        let disk = &*cache.disk;
        if let Some(row) = self.payer_lists.stage_one(&payer, |id, lists| {
            payer_row(held, ledger, disk, *id, lists)
        }) {
            cache.staged.payers.push(row);
        }
    }

    /// How many accounts and payers changed since their rows were last copied
    /// ([`State::stage_changes`]).
    pub fn changes_unstaged(&self) -> usize {
        self.cache.as_ref().map_or(0, |cache| {
            cache.accounts_unstaged.len() + self.payer_lists.changes_pending()
        })
    }

    /// Whether staging now would copy mostly rows not copied before in this checkpoint's
    /// round: at most half of what was staged since the checkpoint began changed again since.
    /// With few payers, each round changes most of the rows the last one did, and copying
    /// them round after round would hand the checkpoint the same rows many times over, where
    /// beginning the checkpoint copies each once (and cheaply: few rows, all in cache).
    pub fn staging_pays(&self) -> bool {
        self.cache.as_ref().is_some_and(|cache| {
            let (payers_staged, payers_again) = self.payer_lists.staged_and_again();
            let staged = cache.accounts_staged + payers_staged;
            let again = cache.accounts_again + payers_again;
            2 * again <= staged
        })
    }

    /// The checkpoint begun at `position` is on disk: its rows are read from there now.
    pub fn checkpoint_written(&mut self, position: u64) {
        let begun = self.frozen.take().map(|(begun, _)| begun);
        self.count_eviction();
        assert_eq!(
            begun,
            Some(position),
            "the checkpoint written is the one begun"
        );
    }

    /// Whether a checkpoint is being written.
    pub fn is_checkpointing(&self) -> bool {
        self.frozen.is_some()
    }

    /// History rows made since the last checkpoint began.
    pub fn young_rows(&self) -> usize {
        self.young.rows() + self.ledger.transfer_records().len()
    }

    /// A rough count of the bytes memory holds for rows it could let go: everything but the
    /// history made since the last checkpoint began (and the frozen history), which it must
    /// hold until written. Not the allocator's own; to decide when to forget.
    pub fn held_bytes(&self) -> usize {
        const HISTORY_ROW: usize = 256;
        const PARTY_ROW: usize = 192;
        const ACCOUNT: usize = 160;
        const IDEMPOTENCY_ROW: usize = 384;
        let loaded = self.loaded.rows() + self.ledger.transfer_count()
            - self.ledger.transfer_records().len();
        loaded * HISTORY_ROW
            + (self.parties.rows_held()
                + self.merchant_lists.keys_held()
                + self.payer_lists.keys_held())
                * PARTY_ROW
            + self.ledger.account_count() * ACCOUNT
            + self.idempotency.len() * IDEMPOTENCY_ROW
            + self.refunded.keys_held() * 64
            + self.kinds.all().map(|rows| rows.keys_held()).sum::<usize>() * 128
    }

    /// Whether memory holds `payer`'s record, its lists and its wallet in `currency`, so that
    /// paying reads nothing from disk: what a cache keeps, for checks.
    pub fn holds_payer(&self, payer: PayerId, currency: Currency) -> bool {
        let wallet = account_id(Owner::Payer(payer), currency);
        self.parties.holds_payer(payer)
            && self.payer_lists.holds(&payer)
            && self.owners.contains_key(&wallet)
            && self.ledger.account(wallet).is_some()
    }

    /// Forgets every row not changed since the last checkpoint began, once that checkpoint
    /// is written: the disk holds them. What changed since stays until the next checkpoint.
    pub fn forget_unchanged(&mut self) {
        self.forget_unused_in(0..CACHE_SHARDS, 0);
    }

    /// [`State::forget_unchanged`] for the rows in `shards` of each table (of
    /// [`CACHE_SHARDS`]), and only rows not used (read, loaded or changed) in the last
    /// `unused_for` rounds of changes (a round ends as each checkpoint begins; 0: however
    /// recently). So memory can be brought back to its budget a few shards at a time, under
    /// short holds of the lock, letting the least recently used rows go first. The history
    /// read back from disk goes whole, each time.
    pub fn forget_unused_in(&mut self, shards: std::ops::Range<usize>, unused_for: u32) {
        assert!(
            self.frozen.is_none(),
            "rows are forgotten once their checkpoint is written"
        );
        // What changed is copied before anything goes: a payer's row copies its accounts.
        self.stage_changes();
        self.count_eviction();
        let round = self.round();
        let Some(cache) = &self.cache else {
            return;
        };
        // Accounts made, or changed by a transfer, since the checkpoint began; and those of
        // a pending hold, whose expiry moves their totals.
        let changed = &cache.accounts_changed;
        let held: HashSet<AccountId, IdHashBuilder> = self
            .ledger
            .all_transfer_records()
            .filter(|record| record.hold == Some(farthing_ledger::HoldState::Pending))
            .flat_map(|record| [record.transfer.debit, record.transfer.credit])
            .collect();
        // Only accounts with an owner are read back from disk, and the owner goes with them.
        // A payer's wallet changed since the checkpoint began makes its payer's row a change
        // (`State::touched_wallet`) rather than joining `changed`.
        let (owners, payer_lists) = (&self.owners, &self.payer_lists);
        let mut forgotten = Vec::new();
        self.ledger.forget_accounts_in(shards.clone(), |id| {
            let stays = changed.contains(id)
                || held.contains(id)
                || owners.get(id).is_none_or(|owned| {
                    owned.used.rounds_since(round) < unused_for
                        || matches!(owned.owner(), Owner::Payer(payer) if payer_lists.is_changed(&payer))
                });
            if !stays {
                forgotten.push(*id);
            }
            stays
        });
        for id in &forgotten {
            self.owners.remove(id);
        }
        // The owners' shards are the accounts' (one key, one hash): they shrink to fit too.
        self.owners
            .retain_and_fit_shards(shards.clone(), |_, _| true);
        self.ledger.forget_loaded_transfers();

        let parties = &self.parties;
        self.merchant_lists
            .forget_unchanged_in(shards.clone(), unused_for, |id| {
                parties.merchant_changed(id)
            });
        self.payer_lists
            .forget_unchanged_in(shards.clone(), unused_for, |id| parties.payer_changed(id));
        let (merchant_lists, payer_lists) = (&self.merchant_lists, &self.payer_lists);
        self.parties.forget_unchanged_in(
            shards.clone(),
            unused_for,
            |id| merchant_lists.holds(id),
            |id| payer_lists.holds(id),
        );
        self.refunded
            .forget_unchanged_in(shards.clone(), unused_for, |_| false);
        for rows in self.kinds.all_mut() {
            rows.forget_unchanged_in(shards.clone(), unused_for);
        }
        self.idempotency.forget_unchanged_in(shards, unused_for);
        self.loaded = Generation::default();
    }
}

impl State {
    /// A whole state holding everything `disk` holds, standing where its last checkpoint
    /// left it: replay the journal from [`State::records_applied`] on to complete it. Memory
    /// grows with history, as any whole state's: for copies and checks, not for serving.
    pub fn whole_from_disk(disk: &dyn disk::DiskScan) -> Result<State, DiskError> {
        let globals: Globals = read_state(disk, GLOBALS_KEY)?.unwrap_or_default();
        let mut state = State::new();
        let bad =
            |what: &str, error: LoadError| DiskError(format!("{what} does not load: {error:?}"));
        state.records_applied = globals.records_applied;
        state.last_time = globals.last_time;
        state.newest_payment = globals.newest_payment;
        state.merchants = globals.merchants;
        state.payers = globals.payers;
        state.idempotency.set_pruned_before(globals.pruned_before);
        if let Some(key_hash) = globals.operator_key {
            state
                .parties
                .load_key(key_hash, Principal::Operator)
                .map_err(|error| bad("the operator key", error))?;
        }
        for entry in disk.scan_state(&[disk::state_kind::KEY]) {
            let (key, value) = entry?;
            let key_hash = KeyHash(
                key[1..]
                    .try_into()
                    .map_err(|_| DiskError("a key entry's key is not a hash".to_string()))?,
            );
            let KeyOwner(principal) = disk::decode(&value)?;
            if principal != Principal::Operator {
                state
                    .insert_key(key_hash, principal)
                    .map_err(|error| bad("a key", error))?;
            }
        }
        for entry in disk.scan_state(&[disk::state_kind::MERCHANT]) {
            let row: MerchantState = disk::decode(&entry?.1)?;
            state
                .insert_merchant_with_lists(row.merchant, row.lists)
                .map_err(|error| bad("a merchant", error))?;
        }
        for entry in disk.scan_state(&[disk::state_kind::PAYER]) {
            let row: PayerState = disk::decode(&entry?.1)?;
            for account in row.account_rows() {
                state
                    .insert_account_unlisted(account.owner, account.account)
                    .map_err(|error| bad("an account", error))?;
            }
            state
                .insert_payer_with_lists(row.payer, row.lists)
                .map_err(|error| bad("a payer", error))?;
        }
        for entry in disk.scan_state(&[disk::state_kind::ACCOUNT]) {
            let row: AccountRow = disk::decode(&entry?.1)?;
            state
                .insert_account_unlisted(row.owner, row.account)
                .map_err(|error| bad("an account", error))?;
        }
        for entry in disk.scan_state(&[disk::state_kind::REFUNDED]) {
            let (key, value) = entry?;
            let id = disk::history_key_id(&key[1..])
                .ok_or_else(|| DiskError("a refund total's key is not an id".to_string()))?;
            let refunded: Refunded = disk::decode(&value)?;
            let _ = state
                .refunded
                .load(PaymentId::from_u128(id), Slot::Present(refunded));
        }
        for info in crate::kinds::KINDS {
            for entry in disk.scan_state(&[info.tag]) {
                let (key, value) = entry?;
                let id = disk::history_key_id(&key[1..]).ok_or_else(|| {
                    DiskError(format!("a row of kind {}'s key is not an id", info.tag))
                })?;
                state.load_row(info.tag, id, Some(&value))?;
            }
        }
        // Records of holds settled after their rows were written, by id.
        let mut resolved: std::collections::HashMap<u128, TransferRecord> =
            std::collections::HashMap::new();
        for entry in disk.scan_state(&[disk::state_kind::TRANSFER]) {
            let (key, value) = entry?;
            let id = disk::history_key_id(&key[1..])
                .ok_or_else(|| DiskError("a transfer's key is not an id".to_string()))?;
            resolved.insert(id, disk::decode(&value)?);
        }
        for entry in disk.scan_state(&[disk::state_kind::IDEMPOTENCY]) {
            let row: IdempotencyRow = disk::decode(&entry?.1)?;
            state.idempotency.put_imported(&row);
        }
        state.idempotency.sort_order_from(0);
        for entry in disk.scan_history() {
            let (key, value) = entry?;
            let Some((&kind, id_bytes)) = key.split_last() else {
                continue;
            };
            let id = disk::history_key_id(id_bytes)
                .ok_or_else(|| DiskError("a history key is not an id".to_string()))?;
            let young = &mut state.young;
            match kind {
                history_kind::PAYMENT => young.push_payment(disk::decode(&value)?),
                history_kind::TOPUP => {
                    let row: TopupRow = disk::decode(&value)?;
                    young.topups.insert(row.topup.id, row);
                }
                history_kind::REFUND => {
                    let row: RefundRow = disk::decode(&value)?;
                    young.refunds.insert(row.refund.id, row);
                }
                history_kind::LINE_OF_TOPUP
                | history_kind::LINE_OF_PAYMENT
                | history_kind::LINE_OF_REFUND => {
                    let object = match kind {
                        history_kind::LINE_OF_TOPUP => {
                            EntryObject::Topup(crate::ids::TopupId::from_u128(id))
                        }
                        history_kind::LINE_OF_PAYMENT => {
                            EntryObject::Payment(PaymentId::from_u128(id))
                        }
                        _ => EntryObject::Refund(crate::ids::RefundId::from_u128(id)),
                    };
                    young.lines.insert(object, disk::decode(&value)?);
                }
                history_kind::TRANSFER => {
                    let record: TransferRecord = match resolved.remove(&id) {
                        Some(record) => record,
                        None => disk::decode(&value)?,
                    };
                    state.ledger.put_imported_transfer_record(record);
                }
                other => {
                    return Err(DiskError(format!("a history row of unknown kind {other}")));
                }
            }
        }
        // Everything is in the young generation and the ledger's records: count it there.
        let held_payments = state.young.payments.len() as u64;
        let held_transfers = state.ledger.transfer_records().len() as u64;
        if held_payments != globals.payments || held_transfers != globals.transfers {
            return Err(DiskError(format!(
                "the disk holds {held_payments} payments and {held_transfers} transfer records, \
                 but counted {} and {}",
                globals.payments, globals.transfers
            )));
        }
        Ok(state)
    }
}
