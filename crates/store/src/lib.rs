//! Storage ports, in domain types. Backends implement them; the service depends only on them.
//!
//! There are two shapes of backend:
//!
//! - [`Journal`], the embedded default: Farthing's state lives in the process's memory and is
//!   made durable as a journal of [`Record`]s. The state is a pure function of the journal, so
//!   appending a record durably is the whole write path, and replaying the journal is the
//!   whole recovery.
//! - [`SharedStore`], for several processes on one database (PostgreSQL): the store holds the
//!   state itself. The service hands it batches of records, which it applies in one
//!   transaction each with the same pure `State::apply`, and asks it the questions the API
//!   answers.
#![forbid(unsafe_code)]

use std::future::Future;
use std::pin::Pin;

use farthing_ledger::{Currency, Timestamp};
use farthing_payments::{
    Entry, EntryObject, IdempotencyKey, KeyHash, MerchantId, Outcome, Page, PayerId, Payment,
    PaymentId, Principal, Record, StoredRow,
};

/// A storage failure. A rejection of a payment is never a `StoreError`: those are outcomes.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The I/O error is told in this error's own message, not as its source, so that a chain
    /// of causes does not say it twice.
    #[error("storage I/O failed: {0}")]
    Io(std::io::Error),
    #[error("the journal is damaged at byte {offset}: {reason}")]
    Corrupt { offset: u64, reason: String },
    #[error("the data directory is in use by another process: {0}")]
    Locked(String),
    /// The database cannot be reached, or dropped the connection: nothing new was
    /// acknowledged; the store reconnects by itself.
    #[error("the database is unavailable: {0}")]
    Unavailable(String),
    /// The database refused a statement, or holds something this build cannot read.
    #[error("the database failed: {0}")]
    Database(String),
}

impl From<farthing_payments::disk::DiskError> for StoreError {
    fn from(error: farthing_payments::disk::DiskError) -> Self {
        StoreError::Database(format!("the history and state on disk failed: {error}"))
    }
}

/// An append-only, durable list of records.
pub trait Journal: Send + 'static {
    /// Appends `records` in order and returns once they are on stable storage (after fsync).
    /// On `Err`, none of them was appended and the journal is as it was, so the caller may
    /// answer "try later" and go on. A backend that cannot promise that (a failed fsync leaves
    /// the disk's contents unknown) must stop the process instead of returning.
    fn append(&mut self, records: &[Record]) -> Result<(), StoreError>;

    /// Feeds every durable record, oldest first, to `visit`, and returns how many there were.
    fn replay(&mut self, visit: &mut dyn FnMut(Record)) -> Result<u64, StoreError>;

    /// Feeds every durable record from `position` on (the count of records before it), and
    /// returns how many it fed. A journal that cannot start there (its records before
    /// `position` are all it knows of them) reads them and skips them.
    fn replay_from(
        &mut self,
        position: u64,
        visit: &mut dyn FnMut(Record),
    ) -> Result<u64, StoreError> {
        let mut seen = 0u64;
        let mut fed = 0u64;
        self.replay(&mut |record| {
            if seen >= position {
                visit(record);
                fed += 1;
            }
            seen += 1;
        })?;
        if seen < position {
            return Err(StoreError::Corrupt {
                offset: 0,
                reason: format!(
                    "the journal holds {seen} records, but a checkpoint holds {position}: \
                     records a checkpoint covered are missing"
                ),
            });
        }
        Ok(fed)
    }

    /// Lets go of records before `before`, which a durable checkpoint holds. A journal that
    /// keeps everything ignores it.
    fn trim(&mut self, before: u64) -> Result<(), StoreError> {
        let _ = before;
        Ok(())
    }
}

/// Where the embedded store's checkpoints go (ADR 0004): a disk holding history and state,
/// so that memory and restart time stay bounded as history grows.
pub trait Checkpoints: Send + Sync + 'static {
    /// The disk a cached state reads through.
    fn disk(&self) -> std::sync::Arc<dyn farthing_payments::disk::Disk>;
    /// Writes `checkpoint` durably: once it returns, the journal before the checkpoint's
    /// position may go.
    fn write(&self, checkpoint: &farthing_payments::Checkpoint) -> Result<(), StoreError>;
}

/// What a [`SharedStore`] call returns: a future that any thread may poll.
impl From<std::io::Error> for StoreError {
    fn from(error: std::io::Error) -> StoreError {
        StoreError::Io(error)
    }
}

pub type StoreFuture<'a, T> = Pin<Box<dyn Future<Output = Result<T, StoreError>> + Send + 'a>>;

/// A record's outcome, and whether it is the stored answer of an earlier record with the same
/// idempotency key (possibly one earlier in the same batch, or one another process applied).
#[derive(Clone, PartialEq, Eq, Debug)]
pub struct Answer {
    pub outcome: Outcome,
    pub replayed: bool,
}

/// What an idempotency key holds now.
#[derive(Clone, PartialEq, Eq, Debug)]
pub struct IdempotencyFound {
    /// The digest of the request that first used the key.
    pub fingerprint: [u8; 32],
    /// Its answer.
    pub outcome: Outcome,
}

/// A page of a payer's statement, or why there is none.
#[derive(Clone, PartialEq, Eq, Debug)]
pub enum StatementPage {
    Page(Page<Entry>),
    UnknownPayer,
    /// The payer exists; the `starting_after` object is not one of its statement lines.
    UnknownCursor,
}

/// The questions the API asks of the state, answered by every backend alike: the embedded
/// store from its state in memory, a shared store from its database. Every answer is of
/// committed (durable) data only.
pub trait Reads: Send + Sync + 'static {
    /// Who holds the key with this hash.
    fn principal<'a>(&'a self, key_hash: &'a KeyHash) -> StoreFuture<'a, Option<Principal>>;
    /// Whether an operator key has been set.
    fn has_operator_key(&self) -> StoreFuture<'_, bool>;
    /// A payer's available balances, sorted by currency; `None` for an unknown payer.
    fn payer_balances(&self, id: PayerId) -> StoreFuture<'_, Option<Vec<(Currency, i128)>>>;
    /// A merchant's available balances, sorted by currency; `None` for an unknown merchant.
    fn merchant_balances(&self, id: MerchantId) -> StoreFuture<'_, Option<Vec<(Currency, i128)>>>;
    fn payment(&self, id: PaymentId) -> StoreFuture<'_, Option<Payment>>;
    /// The state row of the registered kind `tag` under `id` ([`farthing_payments::kinds`]),
    /// in its stored form: how a room's objects are read, with no query of their own.
    fn row(&self, tag: u8, id: u128) -> StoreFuture<'_, Option<StoredRow>>;
    /// The earliest deadline of a live hold: when an expiry is next due.
    fn next_hold_deadline(&self) -> StoreFuture<'_, Option<Timestamp>>;
    /// Payments `principal` may see, newest first, after `starting_after`; `None` when the
    /// cursor is not one of them.
    fn list_payments(
        &self,
        principal: Principal,
        limit: usize,
        starting_after: Option<PaymentId>,
    ) -> StoreFuture<'_, Option<Page<Payment>>>;
    /// A payer's statement, newest first, after the line for `starting_after`.
    fn payer_entries(
        &self,
        payer: PayerId,
        limit: usize,
        starting_after: Option<EntryObject>,
    ) -> StoreFuture<'_, StatementPage>;
}

/// A store that holds the state itself and is shared by several processes. Every answer is
/// of committed data only.
///
/// Implementations must keep the guarantees of the embedded store: [`SharedStore::apply`]
/// gives exactly the outcomes the records get applied one after another to the whole state,
/// durably and atomically (all of a batch or none of it), however many processes apply
/// batches at once; and a refused or failed call changes nothing that was acknowledged.
pub trait SharedStore: Reads {
    /// Applies `records` in order, in one durable transaction.
    fn apply<'a>(&'a self, records: &'a [Record]) -> StoreFuture<'a, Vec<Answer>>;
    /// The first use of an idempotency key, if it is still kept.
    fn idempotency<'a>(
        &'a self,
        key: &'a IdempotencyKey,
    ) -> StoreFuture<'a, Option<IdempotencyFound>>;
    /// Counts the store keeps of its own work in this process, for `/metrics`.
    fn counters(&self) -> Vec<StoreCounter> {
        Vec::new()
    }
}

/// One count a store keeps of its work: a Prometheus counter, with at most one label.
#[derive(Clone, PartialEq, Eq, Debug)]
pub struct StoreCounter {
    /// The metric's name, e.g. `farthing_pg_batches_total`.
    pub name: &'static str,
    pub help: &'static str,
    /// A label and its value, for counters split by a kind.
    pub label: Option<(&'static str, &'static str)>,
    pub value: u64,
}

/// Where a test clock keeps how far it has been moved ahead of the wall clock, so that its
/// time never goes back: not across a restart, and not between servers sharing a database.
/// Only a server started with a test clock uses it.
pub trait TestClockStore: Send + Sync {
    /// Microseconds the test clock runs ahead of the wall clock; 0 when it was never moved.
    fn test_clock_offset(&self) -> StoreFuture<'_, u64>;
    /// Moves the test clock `by_micros` further ahead, durably, and answers the new offset.
    fn advance_test_clock(&self, by_micros: u64) -> StoreFuture<'_, u64>;
}
