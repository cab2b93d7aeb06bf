//! Storage ports, in domain types. Backends implement them; the service depends only on them.
//!
//! The embedded default keeps Farthing's state in memory and makes it durable as a journal of
//! [`Record`]s: the state is a pure function of the journal, so appending a record durably is
//! the whole write path, and replaying the journal is the whole recovery.
#![forbid(unsafe_code)]

use farthing_payments::Record;

/// A storage failure. A rejection of a payment is never a `StoreError`: those are outcomes.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("storage I/O failed: {0}")]
    Io(#[from] std::io::Error),
    #[error("the journal is damaged at byte {offset}: {reason}")]
    Corrupt { offset: u64, reason: String },
    #[error("the data directory is in use by another process: {0}")]
    Locked(String),
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
}
