//! Farthing's application state: operators, merchants, payers, top-ups, payments, refunds and
//! idempotency keys, kept over the ledger.
//!
//! Pure like the ledger beneath it: a [`Record`] (a command with its time, ids and idempotency
//! key already chosen) goes into [`State::apply`], an [`Outcome`] comes out. The journal is a
//! list of records, so replaying it rebuilds the state exactly. [`codec`] turns records into
//! bytes and back. [`State::export`] lists a whole state as [`Imported`] items, and
//! [`Command::Import`] puts such items into another state: how an installation moves between
//! storage backends.
#![forbid(unsafe_code)]
#![deny(clippy::float_arithmetic)]

pub mod codec;
pub mod disk;
mod history;
mod idempotency;
mod ids;
pub mod kinds;
mod model;
mod parties;
mod paying;
pub mod rooms;
mod state;
mod statements;
mod wallets;
mod working_set;

pub use history::{Line, PaymentRow, RefundRow, Refunded, TopupRow};
pub use idempotency::IdempotencyLookup;
pub use ids::{MerchantId, PayerId, PaymentId, RefundId, TopupId};
pub use model::*;
pub use state::{
    CACHE_SHARDS, Checkpoint, CurrencyTotals, Fetched, LOAD_ROUNDS_MAX, Page, State, account_id,
};
pub use working_set::{Changes, LoadError, Needs, PaymentRefunded};
