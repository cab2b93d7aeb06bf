//! How Farthing keeps records, whatever the backend.
//!
//! Every kind of record (a payer, a payment, a statement line…) is described once, by
//! implementing [`Fields`]: it puts its fields, in order, into a [`Put`] and reads them back
//! from a [`Get`]. The same description then serves every layer that stores the record:
//!
//! - [`Binary`] and [`BinaryReader`]: the compact binary form of the journal and of
//!   checkpoints (little-endian, length-prefixed);
//! - [`Columns`]: the column names and SQL types, from which a relational backend builds its
//!   statements and checks its schema;
//! - any other `Put`/`Get` a backend brings (a row of PostgreSQL parameters, say).
//!
//! [`Table`] holds records of one kind by key and remembers which keys changed since it was
//! last asked, so that a backend writes back only those.
//!
//! ```
//! use farthing_kernel::{Binary, BinaryReader, DecodeError, Fields, Get, Put};
//!
//! #[derive(Debug, PartialEq)]
//! struct Note { id: u128, text: String }
//!
//! impl Fields for Note {
//!     fn put(&self, out: &mut impl Put) {
//!         out.id("id", self.id);
//!         out.text("text", &self.text);
//!     }
//!     fn get(input: &mut impl Get) -> Result<Self, DecodeError> {
//!         Ok(Note { id: input.id("id")?, text: input.text("text")? })
//!     }
//! }
//!
//! let note = Note { id: 7, text: "hello".into() };
//! let bytes = Binary::encode(&note);
//! assert_eq!(BinaryReader::decode::<Note>(&bytes), Ok(note));
//! ```
#![forbid(unsafe_code)]
#![deny(clippy::float_arithmetic)]

mod dyn_fields;
mod fields;
mod ledger_records;
mod table;

pub use fields::{
    Binary, BinaryReader, Column, ColumnType, Columns, DecodeError, Fields, Get, Put,
};
pub use ledger_records::{
    hold_state_code, hold_state_of, transfer_rejection_of, transfer_rejection_tag,
};
pub use table::{LastUse, Slot, Table};
