//! The read side of the shared store (ADR 0002): the questions the HTTP handlers ask the
//! in-memory `State` (`principal`, `payer_balances`, `merchant_balances`, `payment`,
//! `list_payments`, `payer_entries`), answered with SQL, with the same answers.
//!
//! **Order of lists.** In memory, "newest first" is the reverse of the order records were
//! applied in. Without a global sequence, a stored payment or statement line carries its
//! `created_at` (the time of the record that made it; the records of one batch share one time)
//! and its `batch_position`, which grows in the order made among a batch's payments and among
//! each payer's lines (see the store's `Lines`: a payment's own line is kept in its row, and a
//! statement reads both places). Lists are ordered by
//! `(created_at DESC, batch_position DESC, id DESC)` and a `starting_after` cursor is resolved
//! to that triple and compared as a row value, so a page is one index range scan. On one
//! server, whose batches get distinct times, this is exactly the in-memory order. Across
//! several servers, two batches committed with the same `created_at` can hold rows with equal
//! times and positions: those fall back to id order (bytewise, which is the ids' numeric
//! order), the same on every server and stable across pages, but not necessarily the order the
//! two batches committed in.
//!
//! Each function runs its statements on the client it is given, one after another: pass a
//! transaction to read them from one snapshot. Parties, payments and statement lines are never
//! deleted, so between separate statements a list can only gain newer rows, which a cursor
//! already taken does not see.

use farthing_ledger::Currency;
use farthing_payments::codec::decode_outcome;
use farthing_payments::{
    Entry, EntryObject, EntryRow, Hold, IdempotencyKey, KeyHash, MerchantId, Outcome, Page,
    PayerId, Payment, PaymentId, Principal,
};
use tokio_postgres::{GenericClient, Row};

use crate::PgError;
use crate::apply::{Id, bytes32, currency_of, id16, principal_columns, principal_of, u128_of};
use crate::rows::{columns, entry_of, read_at};

/// Who holds the key with this hash, or `None` when no one does.
pub async fn principal(
    client: &impl GenericClient,
    key_hash: &KeyHash,
) -> Result<Option<Principal>, PgError> {
    let rows = client
        .query(
            "SELECT 1::SMALLINT, '00000000-0000-0000-0000-000000000000'::UUID
             FROM operator_keys WHERE key_hash = $1
             UNION ALL
             SELECT 2::SMALLINT, id FROM merchants WHERE key_hash = $1
             UNION ALL
             SELECT 3::SMALLINT, id FROM payers WHERE key_hash = $1",
            &[&key_hash.0.as_slice()],
        )
        .await?;
    match rows.as_slice() {
        [] => Ok(None),
        [row] => Ok(Some(principal_of(row.get(0), row.get(1))?)),
        _ => Err(PgError::Stored(
            "a key hash is held by more than one principal".into(),
        )),
    }
}

/// Available balances of a payer's wallets (credits posted − debits posted − debits pending),
/// sorted by currency; `None` when the payer does not exist.
pub async fn payer_balances(
    client: &impl GenericClient,
    id: PayerId,
) -> Result<Option<Vec<(Currency, i128)>>, PgError> {
    balances(client, "payers", 1, id.to_u128()).await
}

/// Available balances of a merchant, sorted by currency; `None` when the merchant does not
/// exist.
pub async fn merchant_balances(
    client: &impl GenericClient,
    id: MerchantId,
) -> Result<Option<Vec<(Currency, i128)>>, PgError> {
    balances(client, "merchants", 2, id.to_u128()).await
}

/// `owner_kind` as in `accounts`: 1 payer, 2 merchant.
async fn balances(
    client: &impl GenericClient,
    parties: &str,
    owner_kind: i16,
    id: u128,
) -> Result<Option<Vec<(Currency, i128)>>, PgError> {
    let id = id16(id);
    if !party_exists(client, parties, &id).await? {
        return Ok(None);
    }
    let rows = client
        .query(
            "SELECT currency::TEXT, credits_posted, debits_posted, debits_pending
             FROM accounts WHERE owner_kind = $1 AND owner_id = $2",
            &[&owner_kind, &id],
        )
        .await?;
    let mut out = Vec::with_capacity(rows.len());
    for row in rows {
        let available = i128::from(row.get::<_, i64>(1))
            - i128::from(row.get::<_, i64>(2))
            - i128::from(row.get::<_, i64>(3));
        out.push((currency_of(row.get(0))?, available));
    }
    out.sort_by_key(|(currency, _)| *currency);
    Ok(Some(out))
}

/// `parties` is `payers` or `merchants`, never input.
async fn party_exists(
    client: &impl GenericClient,
    parties: &str,
    id: &Id,
) -> Result<bool, PgError> {
    let row = client
        .query_one(
            &format!("SELECT EXISTS (SELECT 1 FROM {parties} WHERE id = $1)"),
            &[&id],
        )
        .await?;
    Ok(row.get(0))
}

/// The payment with this id, if any.
pub async fn payment(
    client: &impl GenericClient,
    id: PaymentId,
) -> Result<Option<Payment>, PgError> {
    let payment_columns = payment_with_hold_columns();
    let row = client
        .query_opt(
            &format!("SELECT {payment_columns} {PAYMENTS_WITH_HOLDS} WHERE id = $1"),
            &[&id16(id.to_u128())],
        )
        .await?;
    row.as_ref().map(payment_with_hold_of).transpose()
}

/// The state row of the registered kind `tag` under `id` ([`Reads::row`](farthing_store::Reads)).
pub async fn row(
    client: &impl GenericClient,
    tag: u8,
    id: u128,
) -> Result<Option<farthing_payments::StoredRow>, PgError> {
    crate::kinds::row(client, tag, id).await
}

/// The earliest deadline of a live hold (from the index of live holds).
pub async fn next_hold_deadline(
    client: &impl GenericClient,
) -> Result<Option<farthing_ledger::Timestamp>, PgError> {
    let row = client
        .query_one("SELECT min(expires_at) FROM holds WHERE status = 1", &[])
        .await?;
    let deadline: Option<i64> = row.get(0);
    deadline
        .map(|at| {
            u64::try_from(at)
                .map(farthing_ledger::Timestamp)
                .map_err(|_| PgError::Stored("holds.expires_at is negative".to_string()))
        })
        .transpose()
}

/// Payments with their holds, when they have one.
const PAYMENTS_WITH_HOLDS: &str = "FROM payments LEFT JOIN holds ON holds.payment = payments.id";

/// A payment's columns, then its hold's (all NULL for a payment without one).
fn payment_with_hold_columns() -> String {
    format!("{}, {}", columns::<Payment>(), columns::<Hold>())
}

/// A payment as it stands, read from [`payment_with_hold_columns`].
fn payment_with_hold_of(row: &Row) -> Result<Payment, PgError> {
    let (mut payment, next) = read_at::<Payment>(row, 0)?;
    let status: Option<i16> = row
        .try_get(next)
        .map_err(|error| PgError::Stored(format!("holds.status: {error}")))?;
    if status.is_some() {
        let (hold, _) = read_at::<Hold>(row, next)?;
        hold.apply_to(&mut payment);
    }
    Ok(payment)
}

/// Where a row sits in its list: `(created_at, batch_position, id)`.
type Cursor = (i64, i32, Id);

/// Rows asked for: one more than a page, to tell whether there are more.
fn fetch_limit(limit: usize) -> i64 {
    i64::try_from(limit).unwrap_or(i64::MAX).saturating_add(1)
}

fn page_of<T>(
    rows: Vec<Row>,
    limit: usize,
    item: fn(&Row) -> Result<T, PgError>,
) -> Result<Page<T>, PgError> {
    let has_more = rows.len() > limit;
    let items = rows
        .iter()
        .take(limit)
        .map(item)
        .collect::<Result<Vec<T>, PgError>>()?;
    Ok(Page { items, has_more })
}

/// Payments visible to `principal`, newest first, after the payment `starting_after`, as
/// `State::list_payments` gives them. `None` when the principal is a party that does not exist
/// or the cursor is not a payment the principal may see.
pub async fn list_payments(
    client: &impl GenericClient,
    principal: Principal,
    limit: usize,
    starting_after: Option<PaymentId>,
) -> Result<Option<Page<Payment>>, PgError> {
    if let Principal::Payer(payer) = principal {
        return payer_payments(client, payer, limit, starting_after).await;
    }
    // The column a party's list filters on, and the party's id.
    let party = match principal {
        Principal::Operator | Principal::Payer(_) => None,
        Principal::Merchant(id) => Some(("merchant", "merchants", id16(id.to_u128()))),
    };
    if let Some((_, parties, id)) = &party
        && !party_exists(client, parties, id).await?
    {
        return Ok(None);
    }
    let cursor: Option<Cursor> = match starting_after {
        None => None,
        Some(cursor) => {
            let Some(row) = client
                .query_opt(
                    "SELECT payer, merchant, created_at, batch_position, id FROM payments
                     WHERE id = $1",
                    &[&id16(cursor.to_u128())],
                )
                .await?
            else {
                return Ok(None);
            };
            let visible = match principal {
                Principal::Operator => true,
                Principal::Payer(id) => u128_of(row.get(0))? == id.to_u128(),
                Principal::Merchant(id) => u128_of(row.get(1))? == id.to_u128(),
            };
            if !visible {
                return Ok(None);
            }
            Some((row.get(2), row.get(3), row.get::<_, Id>(4)))
        }
    };
    let fetch = fetch_limit(limit);
    let payment_columns = payment_with_hold_columns();
    let order = "ORDER BY created_at DESC, batch_position DESC, id DESC LIMIT";
    let rows = match (&party, &cursor) {
        (None, None) => {
            client
                .query(
                    &format!("SELECT {payment_columns} {PAYMENTS_WITH_HOLDS} {order} $1"),
                    &[&fetch],
                )
                .await?
        }
        (None, Some((at, position, id))) => {
            client
                .query(
                    &format!(
                        "SELECT {payment_columns} {PAYMENTS_WITH_HOLDS}
                         WHERE (created_at, batch_position, id) < ($1, $2, $3) {order} $4"
                    ),
                    &[at, position, id, &fetch],
                )
                .await?
        }
        (Some((column, _, party)), None) => {
            client
                .query(
                    &format!(
                        "SELECT {payment_columns} {PAYMENTS_WITH_HOLDS}
                         WHERE {column} = $1 {order} $2"
                    ),
                    &[party, &fetch],
                )
                .await?
        }
        (Some((column, _, party)), Some((at, position, id))) => {
            client
                .query(
                    &format!(
                        "SELECT {payment_columns} {PAYMENTS_WITH_HOLDS}
                         WHERE {column} = $1 AND (created_at, batch_position, id) < ($2, $3, $4)
                         {order} $5"
                    ),
                    &[party, at, position, id, &fetch],
                )
                .await?
        }
    };
    page_of(rows, limit, payment_with_hold_of).map(Some)
}

/// A payer's payments, newest first, as a merchant's are listed. A payer's batches have
/// increasing times (a batch is moved past the last change to the accounts it locks), so this
/// is the order the payments were made in.
async fn payer_payments(
    client: &impl GenericClient,
    payer: PayerId,
    limit: usize,
    starting_after: Option<PaymentId>,
) -> Result<Option<Page<Payment>>, PgError> {
    let payer = id16(payer.to_u128());
    if !party_exists(client, "payers", &payer).await? {
        return Ok(None);
    }
    let columns = payment_with_hold_columns();
    let order = "ORDER BY created_at DESC, batch_position DESC, id DESC LIMIT";
    let fetch = fetch_limit(limit);
    let rows = match starting_after {
        None => {
            client
                .query(
                    &format!("SELECT {columns} {PAYMENTS_WITH_HOLDS} WHERE payer = $1 {order} $2"),
                    &[&payer, &fetch],
                )
                .await?
        }
        Some(cursor) => {
            let id = id16(cursor.to_u128());
            let Some(at) = client
                .query_opt(
                    "SELECT created_at, batch_position FROM payments
                     WHERE id = $1 AND payer = $2",
                    &[&id, &payer],
                )
                .await?
            else {
                return Ok(None);
            };
            let (at, position): (i64, i32) = (at.get(0), at.get(1));
            client
                .query(
                    &format!(
                        "SELECT {columns} {PAYMENTS_WITH_HOLDS}
                         WHERE payer = $1 AND (created_at, batch_position, id) < ($2, $3, $4)
                         {order} $5"
                    ),
                    &[&payer, &at, &position, &id, &fetch],
                )
                .await?
        }
    };
    page_of(rows, limit, payment_with_hold_of).map(Some)
}

/// `object_kind`: 1 top-up, 2 payment, 3 refund.
fn object_columns(object: EntryObject) -> (i16, Id) {
    match object {
        EntryObject::Topup(id) => (1, id16(id.to_u128())),
        EntryObject::Payment(id) => (2, id16(id.to_u128())),
        EntryObject::Refund(id) => (3, id16(id.to_u128())),
    }
}

/// A page of a payer's statement (`$1`, at most `$2` lines, after the line at `($4, $5, $6)`
/// when `after`), from both places lines are kept, each read newest first through its own
/// index with its own limit, and the two merged. Payments' own lines are bounded below by `$3`,
/// `payment_lines.made_from` (migration 0005 says why it is a parameter).
fn statement_page(after: bool) -> String {
    let entry_columns = columns::<EntryRow>();
    let after = if after {
        "AND (created_at, batch_position, object_id) < ($4, $5, $6)"
    } else {
        ""
    };
    let order = "ORDER BY created_at DESC, batch_position DESC, object_id DESC LIMIT $2";
    format!(
        "SELECT {entry_columns} FROM (
             (SELECT {entry_columns}, batch_position FROM statement_lines
              WHERE payer = $1 {after} {order})
             UNION ALL
             (SELECT {entry_columns}, batch_position FROM payment_own_lines
              WHERE payer = $1 AND created_at >= $3 {after} {order})
         ) AS lines
         {order}"
    )
}

/// A payer's statement, newest first, after the line for object `starting_after`, as
/// `State::payer_entries` gives it. `None` when the payer is unknown or the cursor is not an
/// object on this payer's statement.
pub async fn payer_entries(
    client: &impl GenericClient,
    payer: PayerId,
    limit: usize,
    starting_after: Option<EntryObject>,
) -> Result<Option<Page<Entry>>, PgError> {
    let payer = id16(payer.to_u128());
    let known = client
        .query_one(
            "SELECT EXISTS (SELECT 1 FROM payers WHERE id = $1),
                    (SELECT made_from FROM payment_lines)",
            &[&payer],
        )
        .await?;
    if !known.get::<_, bool>(0) {
        return Ok(None);
    }
    let made_from: i64 = known.get(1);
    let fetch = fetch_limit(limit);
    let rows = match starting_after {
        None => {
            client
                .query(&statement_page(false), &[&payer, &fetch, &made_from])
                .await?
        }
        Some(object) => {
            let (kind, id) = object_columns(object);
            let objects = match object {
                EntryObject::Topup(_) => "topups",
                EntryObject::Payment(_) => "payments",
                EntryObject::Refund(_) => "refunds",
            };
            // The line has its object's time (a captured hold's, its capture's): look
            // there, in statement order.
            let made = match object {
                EntryObject::Payment(_) => {
                    "COALESCE((SELECT resolved_at FROM holds WHERE payment = $2 AND status = 2),
                              (SELECT created_at FROM payments WHERE id = $2))"
                        .to_string()
                }
                _ => format!("(SELECT created_at FROM {objects} WHERE id = $2)"),
            };
            let Some(row) = client
                .query_opt(
                    &format!(
                        "SELECT created_at, batch_position FROM statement
                         WHERE payer = $1 AND object_id = $2 AND object_kind = $3
                           AND created_at = {made}"
                    ),
                    &[&payer, &id, &kind],
                )
                .await?
            else {
                return Ok(None);
            };
            let (at, position): (i64, i32) = (row.get(0), row.get(1));
            client
                .query(
                    &statement_page(true),
                    &[&payer, &fetch, &made_from, &at, &position, &id],
                )
                .await?
        }
    };
    page_of(rows, limit, entry_of).map(Some)
}

/// The digest of the request that first used an idempotency key, and its answer, while the
/// key is kept.
pub async fn idempotency(
    client: &impl GenericClient,
    key: &IdempotencyKey,
) -> Result<Option<([u8; 32], Outcome)>, PgError> {
    let (kind, principal) = principal_columns(key.principal);
    let row = client
        .query_opt(
            "SELECT fingerprint, outcome FROM idempotency_keys
             WHERE principal_kind = $1 AND principal_id = $2 AND key = $3",
            &[&kind, &principal, &key.key],
        )
        .await?;
    let Some(row) = row else {
        return Ok(None);
    };
    let outcome = decode_outcome(row.get(1))
        .map_err(|error| PgError::Stored(format!("an idempotency outcome: {error}")))?;
    Ok(Some((bytes32(row.get(0))?, outcome)))
}
