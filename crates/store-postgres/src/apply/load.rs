//! Loading a batch's working set: what its records read, in rounds, with payments and then
//! accounts locked in id order.

use std::collections::HashSet;

use farthing_payments::{AccountRow, HoldKind, Kind, MerchantRow, PayerRow};

use super::*;
use crate::rows::*;

/// What a batch reads, gathered over rounds.
#[derive(Default)]
pub(super) struct Wanted {
    /// Another round may want more (see [`Needs::incomplete`]).
    incomplete: bool,
    operator_key: bool,
    key_hashes: BTreeSet<KeyHash>,
    merchants: BTreeSet<MerchantId>,
    payers: BTreeSet<PayerId>,
    payments: BTreeSet<PaymentId>,
    /// Payments read that exist: never assumed new.
    payments_existing: BTreeSet<PaymentId>,
    topups: BTreeSet<TopupId>,
    refunds: BTreeSet<RefundId>,
    accounts: BTreeSet<(Owner, Currency)>,
    transfers: BTreeSet<TransferId>,
    /// Pending transfers of holds to settle: loaded, never assumed new.
    held_transfers: BTreeSet<TransferId>,
    /// State rows of registered kinds, by tag and id.
    rows: BTreeSet<(u8, u128)>,
    /// An expiry's time: the live holds due by then are looked up and loaded.
    holds_due: Option<(Timestamp, usize)>,
    idempotency_keys: BTreeSet<IdempotencyKey>,
}

pub(super) fn wanted_by(working: &State, records: &[Record]) -> Wanted {
    // Gathered in lists and sorted once: a batch of payments lists thousands of each.
    let all = working.needs_of_batch(
        records
            .iter()
            .map(|record| (record.idempotency.as_ref(), &record.command)),
    );
    Wanted {
        incomplete: all.incomplete,
        operator_key: all.operator_key,
        key_hashes: all.key_hashes.into_iter().collect(),
        merchants: all.merchants.into_iter().collect(),
        payers: all.payers.into_iter().collect(),
        payments: all.payments.into_iter().collect(),
        payments_existing: all.payments_existing.into_iter().collect(),
        topups: all.topups.into_iter().collect(),
        refunds: all.refunds.into_iter().collect(),
        accounts: all.accounts.into_iter().collect(),
        transfers: all.transfers.into_iter().collect(),
        held_transfers: all.held_transfers.into_iter().collect(),
        holds_due: all.holds_due,
        rows: all.rows.into_iter().collect(),
        idempotency_keys: all.idempotency_keys.into_iter().collect(),
    }
}

/// What `wanted` lists beyond `asked` (accounts aside: they are locked once, at the end), and
/// adds it to `asked`.
pub(super) fn take_new(wanted: &Wanted, asked: &mut Wanted) -> Wanted {
    fn new<T: Ord + Clone>(wanted: &BTreeSet<T>, asked: &mut BTreeSet<T>) -> BTreeSet<T> {
        let fresh: BTreeSet<T> = wanted.difference(asked).cloned().collect();
        if asked.is_empty() {
            asked.clone_from(&fresh);
        } else {
            asked.extend(fresh.iter().cloned());
        }
        fresh
    }
    let operator_key = wanted.operator_key && !asked.operator_key;
    asked.operator_key |= wanted.operator_key;
    let holds_due = wanted.holds_due.filter(|_| asked.holds_due.is_none());
    asked.holds_due = asked.holds_due.or(wanted.holds_due);
    // One set of transfer ids asked, whichever list named them: an id one round names as a
    // transfer (a reused id) and another as a hold's is loaded once.
    let held_transfers = new(&wanted.held_transfers, &mut asked.transfers);
    let transfers = new(&wanted.transfers, &mut asked.transfers);
    Wanted {
        incomplete: wanted.incomplete,
        operator_key,
        key_hashes: new(&wanted.key_hashes, &mut asked.key_hashes),
        merchants: new(&wanted.merchants, &mut asked.merchants),
        payers: new(&wanted.payers, &mut asked.payers),
        payments: new(&wanted.payments, &mut asked.payments),
        payments_existing: BTreeSet::new(),
        topups: new(&wanted.topups, &mut asked.topups),
        refunds: new(&wanted.refunds, &mut asked.refunds),
        accounts: BTreeSet::new(),
        transfers,
        held_transfers,
        holds_due,
        rows: new(&wanted.rows, &mut asked.rows),
        idempotency_keys: new(&wanted.idempotency_keys, &mut asked.idempotency_keys),
    }
}

impl Wanted {
    fn is_empty(&self) -> bool {
        !self.operator_key
            && self.key_hashes.is_empty()
            && self.merchants.is_empty()
            && self.payers.is_empty()
            && self.payments.is_empty()
            && self.topups.is_empty()
            && self.refunds.is_empty()
            && self.transfers.is_empty()
            && self.held_transfers.is_empty()
            && self.holds_due.is_none()
            && self.rows.is_empty()
            && self.idempotency_keys.is_empty()
    }

    /// Takes out of the loads the ids of new payments (every payment named but those that
    /// exist: refunded, or whose hold is settled) and of new ledger transfers, and adds them
    /// to `assumed`.
    fn assume_free(&mut self, existing: &BTreeSet<PaymentId>, assumed: &mut Assumed) {
        let (kept, new): (Vec<PaymentId>, Vec<PaymentId>) = std::mem::take(&mut self.payments)
            .into_iter()
            .partition(|id| existing.contains(id));
        self.payments = kept.into_iter().collect();
        assumed.payments.append(&mut new.into_iter().collect());
        // A hold's pending transfer exists: it is loaded (as a hold's), never assumed free.
        // (Without one, as in a batch of payments, the whole set moves at once.)
        let held = &self.held_transfers;
        if held.is_empty() {
            assumed.transfers.append(&mut self.transfers);
        } else {
            assumed.transfers.extend(
                std::mem::take(&mut self.transfers)
                    .into_iter()
                    .filter(|id| !held.contains(id)),
            );
        }
    }
}

/// Ids of new objects a batch names that were assumed free instead of loaded.
#[derive(Default)]
pub(super) struct Assumed {
    payments: BTreeSet<PaymentId>,
    transfers: BTreeSet<TransferId>,
}

impl Assumed {
    /// The assumed ids that commands which ran may have read but that the batch does not write:
    /// they must be checked free before the commit. (A written one is checked by its unique
    /// index.)
    pub(super) fn unwritten(
        self,
        working: &State,
        records: &[Record],
        executed: &[bool],
        changes: &Changes,
    ) -> (BTreeSet<PaymentId>, BTreeSet<TransferId>) {
        let (mut payments, mut transfers) = if executed.iter().all(|ran| *ran) {
            (self.payments, self.transfers)
        } else {
            let (mut payments, mut transfers) = (BTreeSet::new(), BTreeSet::new());
            for (record, _) in records.iter().zip(executed).filter(|(_, ran)| **ran) {
                let needs = working.needs(record);
                payments.extend(
                    needs
                        .payments
                        .into_iter()
                        .filter(|id| self.payments.contains(id)),
                );
                transfers.extend(
                    needs
                        .transfers
                        .into_iter()
                        .filter(|id| self.transfers.contains(id)),
                );
            }
            (payments, transfers)
        };
        let written: HashSet<PaymentId> = changes.payments.iter().map(|p| p.id).collect();
        payments.retain(|id| !written.contains(id));
        let written: HashSet<TransferId> =
            changes.transfers.iter().map(|r| r.transfer.id).collect();
        transfers.retain(|id| !written.contains(id));
        (payments, transfers)
    }
}

/// The payments whose holds are due by `at`, as expiries take them: oldest deadline first, at
/// most `most` (what a batch's expiries may release together, [`Needs::holds_due`]).
async fn due_holds(
    transaction: &Transaction<'_>,
    at: Timestamp,
    most: usize,
) -> Result<Vec<PaymentId>, PgError> {
    let limit = i64::try_from(most).unwrap_or(i64::MAX);
    let rows = transaction
        .query_typed(
            "SELECT payment FROM holds WHERE status = 1 AND expires_at <= $1
             ORDER BY expires_at, payment LIMIT $2",
            &[(&big("a time", at.0)?, Type::INT8), (&limit, Type::INT8)],
        )
        .await?;
    rows.iter()
        .map(|row| Ok(PaymentId::from_u128(u128_of(row.try_get(0)?)?)))
        .collect()
}

/// Whether any of these payment or transfer ids is taken. Ids grow with time, so the new
/// transfer ids of a batch (a payment's legs, which no row records) are nearly all above every
/// recorded one: those are answered free by one look at the largest, and only the rest are
/// looked up.
pub(super) async fn any_taken(
    transaction: &Transaction<'_>,
    payments: &BTreeSet<PaymentId>,
    transfers: &BTreeSet<TransferId>,
) -> Result<bool, PgError> {
    if payments.is_empty() && transfers.is_empty() {
        return Ok(false);
    }
    let payments: Vec<Id> = payments.iter().map(|id| id16(id.to_u128())).collect();
    let transfers: Vec<Id> = transfers.iter().map(|id| id16(id.0)).collect();
    let row = transaction
        .query_typed_one(
            "SELECT EXISTS (SELECT 1 FROM unnest($1::UUID[]) AS u(id) JOIN payments USING (id))
                 OR EXISTS (SELECT 1 FROM transfers WHERE id = ANY (ARRAY (
                        SELECT u.id FROM unnest($2::UUID[]) AS u(id)
                        WHERE u.id <= (SELECT id FROM transfers ORDER BY id DESC LIMIT 1))))",
            &[
                (&payments, Type::UUID_ARRAY),
                (&transfers, Type::UUID_ARRAY),
            ],
        )
        .await?;
    Ok(row.get(0))
}

/// A working set holding what `records` read but their accounts, with the payments they refund
/// locked (in id order) until the transaction ends, and the accounts they read, to be taken
/// from a [`Forecast`] or loaded with [`load_accounts`]. Payments are always locked before
/// accounts, each in id order, so concurrent writers never wait on each other in a cycle.
///
/// With `assume_new_ids_free`, the ids of new payments and transfers are not loaded but
/// returned, to be checked (see [`apply_batch`]).
pub(super) async fn load_working_set(
    transaction: &Transaction<'_>,
    records: &[Record],
    assume_new_ids_free: bool,
    forecast: Option<&Forecast>,
) -> Result<(State, Assumed, BTreeSet<(Owner, Currency)>), PgError> {
    let mut working = State::new_working_set();
    let mut asked = Wanted::default();
    let mut assumed = Assumed::default();
    // Payments read that exist (refunded, or whose hold is settled): loaded and locked,
    // never assumed new.
    let mut existing = BTreeSet::new();
    // A refund names only its payment: its payer and accounts are known once that is loaded,
    // in a second round. A batch without such a record is done in one.
    loop {
        let mut wanted = wanted_by(&working, records);
        if assume_new_ids_free {
            existing.extend(std::mem::take(&mut wanted.payments_existing));
            wanted.assume_free(&existing, &mut assumed);
        }
        if let Some(forecast) = forecast {
            take_known_parties(forecast, &wanted, &mut asked, &mut working)?;
        }
        let mut fresh = take_new(&wanted, &mut asked);
        if let Some((at, most)) = fresh.holds_due {
            // Read without a lock: each is locked with its payment below, and read again
            // then, so a hold settled meanwhile is seen settled.
            for id in due_holds(transaction, at, most).await? {
                existing.insert(id);
                if asked.payments.insert(id) {
                    fresh.payments.insert(id);
                }
                // And its hold, read (and locked) once the payment is.
                let row = (HoldKind::TAG, id.to_u128());
                if asked.rows.insert(row) {
                    fresh.rows.insert(row);
                }
            }
        }
        if fresh.is_empty() {
            asked.accounts = wanted.accounts;
            break;
        }
        // An id assumed free in an earlier round that turns out to be a hold's is loaded
        // instead: what it holds is read, not assumed.
        for id in &fresh.held_transfers {
            assumed.transfers.remove(id);
        }
        let transfers_to_load: BTreeSet<TransferId> = fresh
            .transfers
            .union(&fresh.held_transfers)
            .copied()
            .collect();
        // One round's reads, sent together; the only locks among them are the payments'.
        let (keys, merchants, payers, payments, topups, refunds, transfers, idempotency) = tokio::join!(
            biased;
            load_keys(transaction, &fresh),
            load_merchants(transaction, &fresh.merchants),
            load_payers(transaction, &fresh.payers),
            load_payments(transaction, &fresh.payments),
            load_topups(transaction, &fresh.topups),
            load_refunds(transaction, &fresh.refunds),
            load_transfers(transaction, &transfers_to_load),
            load_idempotency(transaction, &fresh),
        );
        for (hash, principal) in keys? {
            if working.principal(&hash).ok().flatten().is_some()
                || (principal == Principal::Operator && working.has_operator_key())
            {
                continue;
            }
            loaded("a key hash", working.insert_key(hash, principal))?;
        }
        let (merchants, payers) = (merchants?, payers?);
        if let Some(forecast) = forecast {
            forecast.learn_parties(&merchants, &payers);
        }
        for merchant in merchants {
            loaded("a merchant", working.insert_merchant(merchant))?;
        }
        for payer in payers {
            loaded("a payer", working.insert_payer(payer))?;
        }
        for payment in payments? {
            loaded("a payment", working.insert_payment(payment))?;
        }
        for topup in topups? {
            loaded("a top-up", working.insert_topup(topup))?;
        }
        for refund in refunds? {
            loaded("a refund", working.insert_refund(refund))?;
        }
        for record in transfers? {
            loaded("a transfer record", working.insert_transfer_record(record))?;
        }
        for row in idempotency? {
            if working.idempotency_record(&row.key).is_some() {
                continue;
            }
            loaded(
                "an idempotency record",
                working.insert_idempotency_record(row),
            )?;
        }
        load_rows(transaction, &mut working, &fresh.rows).await?;
        if !wanted.incomplete {
            asked.accounts = wanted.accounts;
            break;
        }
    }
    Ok((working, assumed, asked.accounts))
}

/// Puts the merchants and payers `wanted` names that the forecast knows into the working
/// set, as asked already.
fn take_known_parties(
    forecast: &Forecast,
    wanted: &Wanted,
    asked: &mut Wanted,
    working: &mut State,
) -> Result<(), PgError> {
    forecast.with_parties(|parties| {
        let mut merchants = Vec::new();
        for id in &wanted.merchants {
            if let Some(merchant) = parties.merchants.get(id)
                && !asked.merchants.contains(id)
            {
                loaded("a merchant", working.insert_merchant(merchant.clone()))?;
                merchants.push(*id);
            }
        }
        let mut payers = Vec::new();
        for id in &wanted.payers {
            if let Some(payer) = parties.payers.get(id)
                && !asked.payers.contains(id)
            {
                loaded("a payer", working.insert_payer(payer.clone()))?;
                payers.push(*id);
            }
        }
        asked.merchants.extend(merchants);
        asked.payers.extend(payers);
        Ok(())
    })
}

pub(super) fn loaded(what: &str, result: Result<(), LoadError>) -> Result<(), PgError> {
    result.map_err(|error| PgError::Stored(format!("{what} does not load: {error:?}")))
}

pub(super) async fn load_keys(
    transaction: &Transaction<'_>,
    fresh: &Wanted,
) -> Result<Vec<(KeyHash, Principal)>, PgError> {
    if !fresh.operator_key && fresh.key_hashes.is_empty() {
        return Ok(Vec::new());
    }
    let hashes: Vec<&[u8]> = fresh.key_hashes.iter().map(|k| k.0.as_slice()).collect();
    let rows = transaction
        .query_typed(
            "SELECT key_hash, 2::SMALLINT, id FROM merchants WHERE key_hash = ANY($1)
             UNION ALL
             SELECT key_hash, 3::SMALLINT, id FROM payers WHERE key_hash = ANY($1)
             UNION ALL
             SELECT key_hash, 1::SMALLINT, '00000000-0000-0000-0000-000000000000'::UUID
             FROM operator_keys
             WHERE $2 OR key_hash = ANY($1)",
            &[
                (&hashes, Type::BYTEA_ARRAY),
                (&fresh.operator_key, Type::BOOL),
            ],
        )
        .await?;
    rows.iter()
        .map(|row| {
            Ok((
                KeyHash(bytes32(row.get(0))?),
                principal_of(row.get(1), row.get(2))?,
            ))
        })
        .collect()
}

/// The rows `sql` selects for `ids` (bound as `$1`, an array of stored ids); no query at all
/// when there are none.
pub(super) async fn rows_by_ids(
    transaction: &Transaction<'_>,
    sql: &str,
    ids: impl Iterator<Item = u128>,
) -> Result<Vec<Row>, PgError> {
    let ids: Vec<Id> = ids.map(id16).collect();
    if ids.is_empty() {
        return Ok(Vec::new());
    }
    Ok(transaction
        .query_typed(sql, &[(&ids, Type::UUID_ARRAY)])
        .await?)
}

pub(super) async fn load_merchants(
    transaction: &Transaction<'_>,
    ids: &BTreeSet<MerchantId>,
) -> Result<Vec<Merchant>, PgError> {
    let sql = format!(
        "SELECT {} FROM merchants WHERE id = ANY($1)",
        columns::<MerchantRow>()
    );
    let rows = rows_by_ids(transaction, &sql, ids.iter().map(|id| id.to_u128())).await?;
    rows.iter().map(merchant_of).collect()
}

pub(super) async fn load_payers(
    transaction: &Transaction<'_>,
    ids: &BTreeSet<PayerId>,
) -> Result<Vec<Payer>, PgError> {
    let sql = format!(
        "SELECT {} FROM payers WHERE id = ANY($1)",
        columns::<PayerRow>()
    );
    let rows = rows_by_ids(transaction, &sql, ids.iter().map(|id| id.to_u128())).await?;
    rows.iter().map(payer_of).collect()
}

/// Payments, locked, each with its hold: a refund changes its payment's refund totals, and a
/// capture, a cancel or an expiry its hold. The holds are read once the payments are locked,
/// so that they are read as the last writer to hold those locks left them.
pub(super) async fn load_payments(
    transaction: &Transaction<'_>,
    ids: &BTreeSet<PaymentId>,
) -> Result<Vec<Payment>, PgError> {
    let sql = format!(
        "SELECT {} FROM payments WHERE id = ANY($1) ORDER BY id FOR UPDATE",
        columns::<Payment>()
    );
    let rows = rows_by_ids(transaction, &sql, ids.iter().map(|id| id.to_u128())).await?;
    rows.iter().map(payment_of).collect()
}

/// State rows of registered kinds, locked in id order per kind; an id with no row is loaded
/// as absent. Read after the round's payments are locked: a hold is settled only by a writer
/// that holds its payment.
async fn load_rows(
    transaction: &Transaction<'_>,
    working: &mut State,
    wanted: &BTreeSet<(u8, u128)>,
) -> Result<(), PgError> {
    for info in farthing_payments::kinds::KINDS {
        let ids: Vec<u128> = wanted
            .iter()
            .filter(|(tag, _)| *tag == info.tag)
            .map(|(_, id)| *id)
            .collect();
        if ids.is_empty() {
            continue;
        }
        let found: HashMap<u128, Vec<u8>> =
            crate::kinds::load_stored(transaction, info, ids.iter().copied())
                .await?
                .into_iter()
                .map(|row| (row.id, row.bytes))
                .collect();
        for id in ids {
            let bytes = found.get(&id).map(Vec::as_slice);
            loaded("a state row", working.insert_row(info.tag, id, bytes))?;
        }
    }
    Ok(())
}

pub(super) async fn load_topups(
    transaction: &Transaction<'_>,
    ids: &BTreeSet<TopupId>,
) -> Result<Vec<Topup>, PgError> {
    let sql = format!(
        "SELECT {} FROM topups WHERE id = ANY($1)",
        columns::<Topup>()
    );
    let rows = rows_by_ids(transaction, &sql, ids.iter().map(|id| id.to_u128())).await?;
    rows.iter().map(topup_of).collect()
}

pub(super) async fn load_refunds(
    transaction: &Transaction<'_>,
    ids: &BTreeSet<RefundId>,
) -> Result<Vec<Refund>, PgError> {
    let sql = format!(
        "SELECT {} FROM refunds WHERE id = ANY($1)",
        columns::<Refund>()
    );
    let rows = rows_by_ids(transaction, &sql, ids.iter().map(|id| id.to_u128())).await?;
    rows.iter().map(refund_of).collect()
}

pub(super) async fn load_transfers(
    transaction: &Transaction<'_>,
    ids: &BTreeSet<TransferId>,
) -> Result<Vec<TransferRecord>, PgError> {
    let sql = format!(
        "SELECT {} FROM transfers WHERE id = ANY($1)",
        columns::<TransferRecord>()
    );
    let rows = rows_by_ids(transaction, &sql, ids.iter().map(|id| id.0)).await?;
    rows.iter().map(transfer_record_of).collect()
}

/// Idempotency records by key, and for a prune every record made before its time.
pub(super) async fn load_idempotency(
    transaction: &Transaction<'_>,
    fresh: &Wanted,
) -> Result<Vec<IdempotencyRow>, PgError> {
    if fresh.idempotency_keys.is_empty() {
        return Ok(Vec::new());
    }
    let mut kinds = Vec::new();
    let mut principals = Vec::new();
    let mut keys = Vec::new();
    for key in &fresh.idempotency_keys {
        let (kind, id) = principal_columns(key.principal);
        kinds.push(kind);
        principals.push(id);
        keys.push(key.key.as_str());
    }
    let rows = transaction
        .query_typed(
            &format!(
                "SELECT {} FROM idempotency_keys
                 WHERE (principal_kind, principal_id, key) IN
                       (SELECT * FROM unnest($1::SMALLINT[], $2::UUID[], $3::TEXT[]))",
                columns::<IdempotencyRow>()
            ),
            &[
                (&kinds, Type::INT2_ARRAY),
                (&principals, Type::UUID_ARRAY),
                (&keys, Type::TEXT_ARRAY),
            ],
        )
        .await?;
    rows.iter().map(idempotency_row_of).collect()
}

/// The accounts wanted that exist, as they stand committed, without locking them.
pub(super) async fn read_accounts(
    transaction: &Transaction<'_>,
    wanted: &BTreeSet<(Owner, Currency)>,
) -> Result<Vec<(Owner, Account, Timestamp)>, PgError> {
    accounts(transaction, wanted, "").await
}

/// The accounts wanted that exist, locked in id order, each with the time it last changed. A
/// row found under another owner (a 2⁻⁶⁴ id collision) comes under that owner, so that the
/// command is refused as the whole state refuses it.
pub(super) async fn load_accounts(
    transaction: &Transaction<'_>,
    wanted: &BTreeSet<(Owner, Currency)>,
) -> Result<Vec<(Owner, Account, Timestamp)>, PgError> {
    accounts(transaction, wanted, "ORDER BY id FOR UPDATE").await
}

async fn accounts(
    transaction: &Transaction<'_>,
    wanted: &BTreeSet<(Owner, Currency)>,
    locking: &str,
) -> Result<Vec<(Owner, Account, Timestamp)>, PgError> {
    if wanted.is_empty() {
        return Ok(Vec::new());
    }
    let mut ids: Vec<i64> = wanted
        .iter()
        .map(|&(owner, currency)| account_id(owner, currency).0 as i64)
        .collect();
    ids.sort_unstable();
    ids.dedup();
    // `changed_at` follows the account's columns.
    let rows = transaction
        .query_typed(
            &format!(
                "SELECT {}, changed_at FROM accounts WHERE id = ANY($1) {locking}",
                columns::<AccountRow>()
            ),
            &[(&ids, Type::INT8_ARRAY)],
        )
        .await?;
    rows.iter().map(account_changed_of).collect()
}
