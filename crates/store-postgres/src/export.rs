//! Reading a whole installation back as [`Imported`] items, in the canonical order of
//! `State::export`, so that a database and an in-memory state can be compared item by item and
//! a database can be copied into an embedded journal (`farthing copy`).
//!
//! Every table is read from one snapshot (a read-only `REPEATABLE READ` transaction) through a
//! portal, some thousands of rows at a time: millions of rows never sit in one query result.
//!
//! The orders match `State::export`: ids are 16 bytes big-endian, so `BYTEA` order is their
//! numeric order; owner and principal kinds are numbered in the order of `Owner` and
//! `Principal`; texts compare bytewise (`COLLATE "C"`), as Rust's strings do; payments come in
//! list order, `(created_at, batch_position, id)`, and each payer's statement lines likewise.

use farthing_ledger::{Account, AccountId, AccountKind, Amount};
use farthing_payments::codec::decode_outcome;
use farthing_payments::{
    FeeSchedule, FundingSource, IdempotencyKey, IdempotencyRow, Imported, KeyHash, Merchant,
    MerchantId, Payer, PayerId, PaymentId, Refund, RefundId, Topup, TopupId,
};
use tokio_postgres::{Client, IsolationLevel, Portal, Row, Transaction};

use crate::PgError;
use crate::apply::{
    amount_of, bytes32, currency_of, owner_of, principal_of, stored, time_of, total_of,
    transfer_record_of, u128_of,
};
use crate::query::{entry_of, payment_of};

/// One table's rows, in export order, and how a row becomes an item.
struct Table {
    sql: &'static str,
    item: fn(&Row) -> Result<Imported, PgError>,
}

/// The tables in export order.
const TABLES: [Table; 10] = [
    Table {
        sql: "SELECT key_hash FROM operator_keys ORDER BY key_hash",
        item: operator_key_item,
    },
    Table {
        sql: "SELECT id, name, key_hash, fee_bps, fee_fixed::TEXT, created_at FROM merchants
              ORDER BY id",
        item: merchant_item,
    },
    Table {
        sql: "SELECT id, name, key_hash, created_at FROM payers ORDER BY id",
        item: payer_item,
    },
    Table {
        sql: "SELECT id, owner_kind, owner_id, currency::TEXT, kind, debits_posted,
                     credits_posted, debits_pending, credits_pending
              FROM accounts ORDER BY owner_kind, owner_id, currency COLLATE \"C\"",
        item: account_item,
    },
    Table {
        sql: "SELECT id, debit_account, credit_account, amount::TEXT, kind, pending_id,
                     timeout_secs, linked, outcome, hold_state, expires_at, created_at
              FROM transfers ORDER BY id",
        item: transfer_item,
    },
    Table {
        sql: PAYMENTS_SQL,
        item: payment_item,
    },
    Table {
        sql: "SELECT id, payer, amount, currency::TEXT, source, created_at FROM topups
              ORDER BY id",
        item: topup_item,
    },
    Table {
        sql: "SELECT id, payment, payer, merchant, amount, currency::TEXT, fee_refunded,
                     created_at
              FROM refunds ORDER BY id",
        item: refund_item,
    },
    Table {
        sql: ENTRIES_SQL,
        item: entry_item,
    },
    Table {
        sql: "SELECT principal_kind, principal_id, key, fingerprint, outcome, created_at
              FROM idempotency_keys ORDER BY principal_kind, principal_id, key COLLATE \"C\"",
        item: idempotency_item,
    },
];

/// Payments in list order, oldest first, with the columns `payment_of` reads (a test holds
/// them to `PAYMENT_COLUMNS`).
const PAYMENTS_SQL: &str = "SELECT id, payer, merchant, amount, currency::TEXT, fee, description,
     reference, created_at, amount_refunded, fee_refunded
     FROM payments ORDER BY created_at, batch_position, id";

/// Statement lines by payer, each payer's in statement order, with the columns `entry_of`
/// reads and the payer last.
const ENTRIES_SQL: &str = "SELECT object_kind, object_id, currency::TEXT, credit, amount,
     balance_after, created_at, payer
     FROM statement_lines ORDER BY payer, created_at, batch_position, object_id";

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
        while let Some(table) = TABLES.get(self.table) {
            let portal = match &self.portal {
                Some(portal) => portal,
                None => self
                    .portal
                    .insert(self.transaction.bind(table.sql, &[]).await?),
            };
            let rows = self.transaction.query_portal(portal, rows_max).await?;
            if rows.len() < rows_max as usize {
                self.portal = None;
                self.table += 1;
            }
            if !rows.is_empty() {
                return rows.iter().map(table.item).collect();
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
    Ok(Imported::OperatorKey(KeyHash(bytes32(row.get(0))?)))
}

fn merchant_item(row: &Row) -> Result<Imported, PgError> {
    Ok(Imported::Merchant {
        merchant: Merchant {
            id: MerchantId::from_u128(u128_of(row.get(0))?),
            name: row.get(1),
            fee: FeeSchedule {
                bps: u32::try_from(row.get::<_, i32>(3)).map_err(|_| stored("fee_bps"))?,
                fixed: Amount::from_micros(
                    row.get::<_, String>(4)
                        .parse()
                        .map_err(|_| stored("fee_fixed"))?,
                ),
            },
            created_at: time_of(row.get(5))?,
        },
        key_hash: KeyHash(bytes32(row.get(2))?),
    })
}

fn payer_item(row: &Row) -> Result<Imported, PgError> {
    Ok(Imported::Payer {
        payer: Payer {
            id: PayerId::from_u128(u128_of(row.get(0))?),
            name: row.get(1),
            created_at: time_of(row.get(3))?,
        },
        key_hash: KeyHash(bytes32(row.get(2))?),
    })
}

fn account_item(row: &Row) -> Result<Imported, PgError> {
    Ok(Imported::Account {
        owner: owner_of(row.get(1), row.get(2))?,
        account: Account {
            id: AccountId(row.get::<_, i64>(0) as u64),
            kind: AccountKind::from_u8(
                u8::try_from(row.get::<_, i16>(4)).map_err(|_| stored("accounts.kind"))?,
            )
            .ok_or_else(|| stored("accounts.kind"))?,
            currency: currency_of(row.get(3))?,
            debits_posted: total_of(row.get(5))?,
            credits_posted: total_of(row.get(6))?,
            debits_pending: total_of(row.get(7))?,
            credits_pending: total_of(row.get(8))?,
        },
    })
}

fn transfer_item(row: &Row) -> Result<Imported, PgError> {
    Ok(Imported::Transfer(transfer_record_of(row)?))
}

fn payment_item(row: &Row) -> Result<Imported, PgError> {
    Ok(Imported::Payment(payment_of(row)?))
}

fn topup_item(row: &Row) -> Result<Imported, PgError> {
    Ok(Imported::Topup(Topup {
        id: TopupId::from_u128(u128_of(row.get(0))?),
        payer: PayerId::from_u128(u128_of(row.get(1))?),
        amount: amount_of(row.get(2))?,
        currency: currency_of(row.get(3))?,
        source: match row.get::<_, i16>(4) {
            1 => FundingSource::Sandbox,
            2 => FundingSource::SandboxDecline,
            _ => return Err(stored("topups.source")),
        },
        created_at: time_of(row.get(5))?,
    }))
}

fn refund_item(row: &Row) -> Result<Imported, PgError> {
    Ok(Imported::Refund(Refund {
        id: RefundId::from_u128(u128_of(row.get(0))?),
        payment: PaymentId::from_u128(u128_of(row.get(1))?),
        payer: PayerId::from_u128(u128_of(row.get(2))?),
        merchant: MerchantId::from_u128(u128_of(row.get(3))?),
        amount: amount_of(row.get(4))?,
        currency: currency_of(row.get(5))?,
        fee_refunded: amount_of(row.get(6))?,
        created_at: time_of(row.get(7))?,
    }))
}

fn entry_item(row: &Row) -> Result<Imported, PgError> {
    Ok(Imported::Entry {
        payer: PayerId::from_u128(u128_of(row.get(7))?),
        entry: entry_of(row)?,
    })
}

fn idempotency_item(row: &Row) -> Result<Imported, PgError> {
    Ok(Imported::Idempotency(IdempotencyRow {
        key: IdempotencyKey {
            principal: principal_of(row.get(0), row.get(1))?,
            key: row.get(2),
        },
        fingerprint: bytes32(row.get(3))?,
        outcome: decode_outcome(row.get(4))
            .map_err(|error| PgError::Stored(format!("an idempotency outcome: {error}")))?,
        made: time_of(row.get(5))?,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::query::{ENTRY_COLUMNS, PAYMENT_COLUMNS};

    /// The export reads rows with the columns, in the order, that the read side's row
    /// readers expect.
    #[test]
    fn the_payment_and_entry_queries_select_the_columns_their_readers_expect() {
        let squeeze = |sql: &str| sql.split_whitespace().collect::<Vec<_>>().join(" ");
        assert!(squeeze(PAYMENTS_SQL).starts_with(&format!(
            "SELECT {} FROM payments",
            squeeze(PAYMENT_COLUMNS)
        )));
        assert!(squeeze(ENTRIES_SQL).starts_with(&format!(
            "SELECT {}, payer FROM statement_lines",
            squeeze(ENTRY_COLUMNS)
        )));
    }
}
