//! How rows are read: each kind of record's columns and reader come from its one description
//! ([`Fields`]), for the write path (`apply`), the read side (`query`) and the export alike, so
//! a column list and its reader cannot drift apart.
//!
//! A query may select more columns after a record's: [`read_at`] says where the record's end.
//! Reads never panic on what a database holds: a column of another type, a NULL where none
//! belongs or a value out of range is a `PgError::Stored` that names the column.

use std::any::TypeId;
use std::collections::HashMap;
use std::sync::Mutex;

use farthing_kernel::{ColumnType, Columns, DecodeError, Fields, Get};
use farthing_ledger::{Account, Currency, Timestamp, TransferRecord};
use farthing_payments::{
    Entry, EntryRow, IdempotencyRow, Merchant, MerchantRow, Owner, Payer, PayerRow, Payment,
    Refund, Topup,
};
use tokio_postgres::Row;
use tokio_postgres::types::FromSql;

use crate::PgError;
use crate::apply::Id;

/// The select list of a kind of record: its columns in order, with those PostgreSQL keeps in
/// types the driver does not read as such (`NUMERIC`, `CHAR`) cast to text.
pub(crate) fn columns<T: Fields + 'static>() -> &'static str {
    static LISTS: Mutex<Option<HashMap<TypeId, &'static str>>> = Mutex::new(None);
    let mut lists = LISTS.lock().expect("column lists lock");
    lists
        .get_or_insert_with(HashMap::new)
        .entry(TypeId::of::<T>())
        .or_insert_with(|| {
            let list = Columns::list::<T>()
                .iter()
                .map(|column| match column.ty {
                    ColumnType::Wide | ColumnType::Currency => format!("{}::TEXT", column.name),
                    _ => column.name.to_owned(),
                })
                .collect::<Vec<_>>()
                .join(", ");
            // One string per kind of record, made once: a bounded, deliberate leak.
            Box::leak(list.into_boxed_str())
        })
}

/// A record read from a row's first columns.
pub(crate) fn read<T: Fields>(row: &Row) -> Result<T, PgError> {
    read_at(row, 0).map(|(record, _)| record)
}

/// A record read from a row's columns from `start`, and the index of the column after it.
pub(crate) fn read_at<T: Fields>(row: &Row, start: usize) -> Result<(T, usize), PgError> {
    let mut input = RowGet {
        row,
        at: start,
        column: "",
    };
    match T::get(&mut input) {
        Ok(record) => Ok((record, input.at)),
        Err(error) => Err(PgError::Stored(format!(
            "column {} holds what this build cannot read ({error})",
            input.column
        ))),
    }
}

/// A record of a kind known only by a registry entry, read through its `get`.
pub(crate) fn read_with<T>(
    row: &Row,
    get: fn(&mut dyn Get) -> Result<T, DecodeError>,
) -> Result<T, PgError> {
    let mut input = RowGet {
        row,
        at: 0,
        column: "",
    };
    get(&mut input).map_err(|error| {
        PgError::Stored(format!(
            "column {} holds what this build cannot read ({error})",
            input.column
        ))
    })
}

/// Reads a row's columns in order.
struct RowGet<'a> {
    row: &'a Row,
    at: usize,
    /// The column being read, named when it fails.
    column: &'static str,
}

impl<'a> RowGet<'a> {
    fn next<T: FromSql<'a>>(&mut self, name: &'static str) -> Result<T, DecodeError> {
        self.column = name;
        let value = self
            .row
            .try_get(self.at)
            .map_err(|_| DecodeError::OutOfRange)?;
        self.at += 1;
        Ok(value)
    }

    fn nonnegative(value: i64) -> Result<u64, DecodeError> {
        u64::try_from(value).map_err(|_| DecodeError::OutOfRange)
    }

    fn small(value: i16) -> Result<u8, DecodeError> {
        u8::try_from(value).map_err(|_| DecodeError::OutOfRange)
    }
}

impl Get for RowGet<'_> {
    fn id(&mut self, name: &'static str) -> Result<u128, DecodeError> {
        Ok(u128::from_be_bytes(self.next::<Id>(name)?.0))
    }
    fn opt_id(&mut self, name: &'static str) -> Result<Option<u128>, DecodeError> {
        Ok(self
            .next::<Option<Id>>(name)?
            .map(|id| u128::from_be_bytes(id.0)))
    }
    fn int(&mut self, name: &'static str) -> Result<u64, DecodeError> {
        Self::nonnegative(self.next(name)?)
    }
    fn opt_int(&mut self, name: &'static str) -> Result<Option<u64>, DecodeError> {
        self.next::<Option<i64>>(name)?
            .map(Self::nonnegative)
            .transpose()
    }
    fn wide(&mut self, name: &'static str) -> Result<u64, DecodeError> {
        self.next::<&str>(name)?
            .parse()
            .map_err(|_| DecodeError::OutOfRange)
    }
    fn bits(&mut self, name: &'static str) -> Result<u64, DecodeError> {
        // A 64-bit key kept bit-cast in a signed column.
        Ok(self.next::<i64>(name)? as u64)
    }
    fn code(&mut self, name: &'static str) -> Result<u8, DecodeError> {
        Self::small(self.next(name)?)
    }
    fn opt_code(&mut self, name: &'static str) -> Result<Option<u8>, DecodeError> {
        self.next::<Option<i16>>(name)?.map(Self::small).transpose()
    }
    fn word(&mut self, name: &'static str) -> Result<u32, DecodeError> {
        // A u32 kept bit-cast in a signed column.
        Ok(self.next::<i32>(name)? as u32)
    }
    fn opt_word(&mut self, name: &'static str) -> Result<Option<u32>, DecodeError> {
        Ok(self.next::<Option<i32>>(name)?.map(|value| value as u32))
    }
    fn currency(&mut self, name: &'static str) -> Result<Currency, DecodeError> {
        Currency::parse(self.next::<&str>(name)?).ok_or(DecodeError::InvalidCurrency)
    }
    fn flag(&mut self, name: &'static str) -> Result<bool, DecodeError> {
        self.next(name)
    }
    fn text(&mut self, name: &'static str) -> Result<String, DecodeError> {
        self.next(name)
    }
    fn opt_text(&mut self, name: &'static str) -> Result<Option<String>, DecodeError> {
        self.next(name)
    }
    fn digest(&mut self, name: &'static str) -> Result<[u8; 32], DecodeError> {
        self.next::<&[u8]>(name)?
            .try_into()
            .map_err(|_| DecodeError::OutOfRange)
    }
    fn blob(&mut self, name: &'static str) -> Result<Vec<u8>, DecodeError> {
        self.next(name)
    }
}

pub(crate) fn merchant_of(row: &Row) -> Result<Merchant, PgError> {
    read::<MerchantRow>(row).map(|row| row.merchant)
}

pub(crate) fn payer_of(row: &Row) -> Result<Payer, PgError> {
    read::<PayerRow>(row).map(|row| row.payer)
}

pub(crate) fn payment_of(row: &Row) -> Result<Payment, PgError> {
    read(row)
}

pub(crate) fn topup_of(row: &Row) -> Result<Topup, PgError> {
    read(row)
}

pub(crate) fn refund_of(row: &Row) -> Result<Refund, PgError> {
    read(row)
}

pub(crate) fn transfer_record_of(row: &Row) -> Result<TransferRecord, PgError> {
    read(row)
}

pub(crate) fn idempotency_row_of(row: &Row) -> Result<IdempotencyRow, PgError> {
    read(row)
}

pub(crate) fn entry_of(row: &Row) -> Result<Entry, PgError> {
    read::<EntryRow>(row).map(|row| row.entry)
}

/// An account, its owner, and the time read from the column after them.
pub(crate) fn account_changed_of(row: &Row) -> Result<(Owner, Account, Timestamp), PgError> {
    let (account, next) = read_at::<farthing_payments::AccountRow>(row, 0)?;
    let changed_at: i64 = row
        .try_get(next)
        .map_err(|error| PgError::Stored(format!("accounts.changed_at: {error}")))?;
    let changed_at = u64::try_from(changed_at)
        .map_err(|_| PgError::Stored("accounts.changed_at is out of range".into()))?;
    Ok((account.owner, account.account, Timestamp(changed_at)))
}
