//! Farthing's ledger core: money conserved by construction.
//!
//! Pure: no I/O, no clock, no randomness, no serialization. Time is an argument, ids are chosen
//! by the caller, and the same batches applied in the same order give the same state.
//!
//! ```
//! use farthing_ledger::*;
//! let usd = Currency::parse("USD").unwrap();
//! let mut ledger = Ledger::new();
//! ledger.create_account(AccountId(1), AccountKind::ExternalFunding, usd).unwrap();
//! ledger.create_account(AccountId(2), AccountKind::PayerWallet, usd).unwrap();
//! let topup = Transfer {
//!     id: TransferId(7),
//!     debit: AccountId(1),
//!     credit: AccountId(2),
//!     amount: Amount::parse_decimal("0.0025").unwrap(),
//!     kind: TransferKind::Posted,
//!     linked: false,
//! };
//! assert_eq!(ledger.apply(Timestamp(0), &[topup]), vec![Ok(())]);
//! assert_eq!(ledger.account(AccountId(2)).unwrap().available(), 2_500);
//! ```
#![forbid(unsafe_code)]
#![deny(clippy::float_arithmetic)]

mod hash;
mod ledger;
mod map;
mod money;

pub use hash::{IdHashBuilder, IdHasher};
pub use ledger::{
    Account, AccountId, AccountKind, AccountRejection, HoldState, IdMax, Ledger, TOTAL_MICROS_MAX,
    TRANSFERS_PER_BATCH_MAX, Timestamp, Transfer, TransferId, TransferKind, TransferRecord,
    TransferRecords, TransferRejection,
};
pub use map::{SHARDS, ShardedMap};
pub use money::{AMOUNT_DECIMALS_MAX, Amount, AmountParseError, Currency, MICROS_PER_UNIT};
