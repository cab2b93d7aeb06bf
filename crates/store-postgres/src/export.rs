//! Reading a whole installation back as [`Imported`] items, in the canonical order of
//! `State::export`, so that a database and an in-memory state can be compared item by item and
//! a database can be copied into an embedded journal (`farthing copy`).
//!
//! Every table is read from one snapshot (a read-only `REPEATABLE READ` transaction) through a
//! portal, some thousands of rows at a time: millions of rows never sit in one query result.
//!
//! The orders match `State::export`: ids are UUIDs of 16 bytes big-endian, which PostgreSQL
//! compares bytewise, so their order is their numeric order; owner and principal kinds are
//! numbered in the order of `Owner` and `Principal`; texts compare bytewise (`COLLATE "C"`), as
//! Rust's strings do; payments come in list order, `(created_at, batch_position, id)`, and each
//! payer's statement lines likewise.

use farthing_ledger::TransferRecord;
use farthing_payments::StoredRow;
use farthing_payments::kinds::{KINDS, KindInfo};
use farthing_payments::{
    AccountRow, EntryRow, HoldStatus, IdempotencyRow, Imported, KeyHash, MerchantRow, PayerRow,
    Payment, Refund, Topup,
};
use tokio_postgres::{Client, IsolationLevel, Portal, Row, Transaction};

use crate::PgError;
use crate::apply::bytes32;
use crate::rows::*;

/// One table's rows, in export order, and how a row becomes an item.
struct Table {
    /// The columns the item's reader takes.
    columns: fn() -> &'static str,
    /// The rest of the query: `FROM … ORDER BY …`.
    from: &'static str,
    item: fn(&Row) -> Result<Imported, PgError>,
}

impl Table {
    fn sql(&self) -> String {
        format!("SELECT {} {}", (self.columns)(), self.from)
    }
}

/// Where the state rows of registered kinds come in the export order: after payments (a
/// hold names its payment).
const KINDS_AFTER: usize = 6;

/// What an export reads next: one of [`TABLES`], or the table of a registered kind.
enum Source {
    Table(&'static Table),
    Kind(&'static KindInfo),
}

/// Every source in export order: the tables, with the registered kinds after payments.
fn sources() -> impl Iterator<Item = Source> {
    let (before, after) = TABLES.split_at(KINDS_AFTER);
    before
        .iter()
        .map(Source::Table)
        .chain(KINDS.iter().map(Source::Kind))
        .chain(after.iter().map(Source::Table))
}

/// The tables in export order.
const TABLES: [Table; 10] = [
    Table {
        columns: || "key_hash",
        from: "FROM operator_keys ORDER BY key_hash",
        item: operator_key_item,
    },
    Table {
        columns: columns::<MerchantRow>,
        from: "FROM merchants ORDER BY id",
        item: merchant_item,
    },
    Table {
        columns: columns::<PayerRow>,
        from: "FROM payers ORDER BY id",
        item: payer_item,
    },
    Table {
        columns: columns::<AccountRow>,
        from: "FROM accounts ORDER BY owner_kind, owner_id, currency COLLATE \"C\"",
        item: account_item,
    },
    Table {
        columns: columns::<TransferRecord>,
        from: "FROM transfers ORDER BY id",
        item: transfer_item,
    },
    // Payments in list order, oldest first; a captured hold's with the figures of its capture.
    Table {
        columns: payment_columns,
        from: "FROM payments LEFT JOIN holds ON holds.payment = payments.id
               ORDER BY created_at, batch_position, id",
        item: payment_item,
    },
    Table {
        columns: columns::<Topup>,
        from: "FROM topups ORDER BY id",
        item: topup_item,
    },
    Table {
        columns: columns::<Refund>,
        from: "FROM refunds ORDER BY id",
        item: refund_item,
    },
    // Statement lines by payer, each payer's in statement order, wherever they are kept.
    Table {
        columns: columns::<EntryRow>,
        from: "FROM statement ORDER BY payer, created_at, batch_position, object_id",
        item: entry_item,
    },
    Table {
        columns: columns::<IdempotencyRow>,
        from: "FROM idempotency_keys ORDER BY principal_kind, principal_id, key COLLATE \"C\"",
        item: idempotency_item,
    },
];

/// A consistent view of a database for exporting: everything read through it comes from one
/// moment, whatever writers do meanwhile.
pub struct Snapshot<'a> {
    transaction: Transaction<'a>,
}

/// Opens a snapshot of the database `client` is connected to.
pub async fn snapshot(client: &mut Client) -> Result<Snapshot<'_>, PgError> {
    let transaction = client
        .build_transaction()
        .isolation_level(IsolationLevel::RepeatableRead)
        .read_only(true)
        .start()
        .await?;
    Ok(Snapshot { transaction })
}

impl<'a> Snapshot<'a> {
    /// Every item of the snapshot, from the start, in export order. May be called again for a
    /// second pass over the same snapshot.
    pub fn items(&self) -> Items<'_> {
        Items {
            transaction: &self.transaction,
            table: 0,
            portal: None,
        }
    }

    /// Ends the snapshot.
    pub async fn close(self) -> Result<(), PgError> {
        self.transaction.commit().await?;
        Ok(())
    }
}

/// Items of a snapshot, read a chunk at a time.
pub struct Items<'s> {
    transaction: &'s Transaction<'s>,
    table: usize,
    portal: Option<Portal>,
}

impl Items<'_> {
    /// The next items, at most `rows_max` and all from one table; empty once every table has
    /// been read.
    pub async fn next_chunk(&mut self, rows_max: usize) -> Result<Vec<Imported>, PgError> {
        let rows_max = i32::try_from(rows_max.max(1)).unwrap_or(i32::MAX);
        while let Some(source) = sources().nth(self.table) {
            let sql = match &source {
                Source::Table(table) => table.sql(),
                Source::Kind(info) => crate::kinds::export_sql(info),
            };
            let portal = match &self.portal {
                Some(portal) => portal,
                None => self.portal.insert(self.transaction.bind(&sql, &[]).await?),
            };
            let rows = self.transaction.query_portal(portal, rows_max).await?;
            if rows.len() < rows_max as usize {
                self.portal = None;
                self.table += 1;
            }
            if !rows.is_empty() {
                return match source {
                    Source::Table(table) => rows.iter().map(table.item).collect(),
                    Source::Kind(info) => rows
                        .iter()
                        .map(|row| {
                            let (id, bytes) = read_with(row, info.get)?;
                            Ok(Imported::Row(StoredRow {
                                tag: info.tag,
                                id,
                                bytes,
                            }))
                        })
                        .collect(),
                };
            }
        }
        Ok(Vec::new())
    }
}

/// Every item of the database, from one snapshot, in export order. Holds them all in memory:
/// for tests and small installations; `farthing copy` reads in chunks.
pub async fn export_all(client: &mut Client) -> Result<Vec<Imported>, PgError> {
    let snapshot = snapshot(client).await?;
    let mut all = Vec::new();
    {
        let mut items = snapshot.items();
        loop {
            let chunk = items.next_chunk(10_000).await?;
            if chunk.is_empty() {
                break;
            }
            all.extend(chunk);
        }
    }
    snapshot.close().await?;
    Ok(all)
}

/// Whether an import record made from an export may end between these two of its items so
/// that [`crate::batch_may_end_between`] may end a batch there: not inside a run of payments
/// of one time, nor inside a run of one payer's statement lines of one time (rows that share
/// a time are ordered by their place in their batch).
pub fn chunk_may_end_between(previous: &Imported, next: &Imported) -> bool {
    match (previous, next) {
        (Imported::Payment(a), Imported::Payment(b)) => a.created_at != b.created_at,
        (
            Imported::Entry { payer, entry },
            Imported::Entry {
                payer: next_payer,
                entry: next_entry,
            },
        ) => payer != next_payer || entry.created_at != next_entry.created_at,
        _ => true,
    }
}

fn operator_key_item(row: &Row) -> Result<Imported, PgError> {
    let key_hash: &[u8] = row
        .try_get(0)
        .map_err(|error| PgError::Stored(format!("operator_keys.key_hash: {error}")))?;
    Ok(Imported::OperatorKey(KeyHash(bytes32(key_hash)?)))
}

fn merchant_item(row: &Row) -> Result<Imported, PgError> {
    let MerchantRow { merchant, key_hash } = read(row)?;
    Ok(Imported::Merchant { merchant, key_hash })
}

fn payer_item(row: &Row) -> Result<Imported, PgError> {
    let PayerRow { payer, key_hash } = read(row)?;
    Ok(Imported::Payer { payer, key_hash })
}

fn account_item(row: &Row) -> Result<Imported, PgError> {
    let AccountRow { owner, account } = read(row)?;
    Ok(Imported::Account { owner, account })
}

fn transfer_item(row: &Row) -> Result<Imported, PgError> {
    Ok(Imported::Transfer(read(row)?))
}

/// A payment's columns as `State::export` lists it: a captured hold's amount and fee are
/// those of its capture (which its refunds were worked out on), not those authorized.
fn payment_columns() -> &'static str {
    static COLUMNS: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    COLUMNS.get_or_init(|| {
        columns::<Payment>()
            .split(", ")
            .map(|column| match column {
                "amount" | "fee" => format!(
                    "CASE WHEN holds.status = {captured} THEN holds.{column}_captured \
                     ELSE payments.{column} END",
                    captured = HoldStatus::Captured.code()
                ),
                other => other.to_string(),
            })
            .collect::<Vec<_>>()
            .join(", ")
    })
}

fn payment_item(row: &Row) -> Result<Imported, PgError> {
    Ok(Imported::Payment(read(row)?))
}

fn topup_item(row: &Row) -> Result<Imported, PgError> {
    Ok(Imported::Topup(read(row)?))
}

fn refund_item(row: &Row) -> Result<Imported, PgError> {
    Ok(Imported::Refund(read(row)?))
}

fn entry_item(row: &Row) -> Result<Imported, PgError> {
    let EntryRow { payer, entry } = read(row)?;
    Ok(Imported::Entry { payer, entry })
}

fn idempotency_item(row: &Row) -> Result<Imported, PgError> {
    Ok(Imported::Idempotency(read(row)?))
}
