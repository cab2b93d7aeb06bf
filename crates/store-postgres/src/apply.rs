//! Applying a batch of records in one PostgreSQL transaction (ADR 0002): load what the batch
//! reads into a working set, run the same `State::apply` the embedded store runs, and write
//! back what changed, set-based.
//!
//! Stored forms: object ids are 16 bytes big-endian; times are BIGINT microseconds; account ids
//! are the derived 64-bit id bit-cast to BIGINT; currencies are their three letters. New
//! payments and statement lines also get their `batch_position`, their place in the batch's
//! `Changes` (the order made), which orders lists between rows of one time (see `query`).
//!
//! Round trips: the statements of one loading round, and all the statements that persist a
//! batch, are sent together (tokio-postgres pipelines requests issued concurrently on one
//! connection), each with its parameter types given, so none waits for a prepare. Large sets
//! of new payments, statement lines and transfers go in with binary `COPY`, smaller ones with
//! `INSERT … SELECT FROM unnest(…)`.

use std::collections::{BTreeSet, HashMap};
use std::time::{Duration, Instant};

use bytes::{BufMut, Bytes, BytesMut};
use farthing_ledger::{
    Account, AccountId, AccountKind, Amount, Currency, HoldState, Timestamp, Transfer, TransferId,
    TransferKind, TransferRecord, TransferRejection,
};
use farthing_payments::codec::{decode_outcome, encode_outcome};
use farthing_payments::{
    Changes, Command, Entry, EntryObject, FeeSchedule, FundingSource, IdempotencyKey,
    IdempotencyLookup, IdempotencyRow, KeyHash, LoadError, Merchant, MerchantId, Outcome, Owner,
    Payer, PayerId, Payment, PaymentId, Principal, Record, Refund, RefundId, State, Topup, TopupId,
    account_id,
};
use futures_util::SinkExt;
use tokio_postgres::error::SqlState;
use tokio_postgres::types::Type;
use tokio_postgres::{Client, Row, Statement, Transaction};

use crate::PgError;

/// Attempts at a batch before a conflict is returned.
pub const ATTEMPTS_MAX: u32 = 5;

/// From this many new rows for one table, they go in with binary `COPY` (PostgreSQL's bulk
/// path: a few heap pages per WAL record instead of one record per row); below it, with one
/// `INSERT … unnest`, which takes one round trip fewer.
const COPY_ROWS_MIN: usize = 256;

/// Applies `records` in order in one transaction and returns their outcomes, exactly those the
/// records get applied one after another to the whole state.
///
/// A serialization failure, a deadlock or a unique violation (another writer made the same
/// idempotency key or id first) rolls back and redoes the whole batch, up to [`ATTEMPTS_MAX`]
/// attempts with a short jittered sleep; then the error is returned.
///
/// The ids of new payments and ledger transfers are assumed free rather than loaded: those the
/// batch writes are checked by their unique indexes, the others by one query before the
/// commit. When one is taken after all, the batch is rolled back and applied again with them
/// loaded, so the outcomes are those of the whole state either way.
pub async fn apply_batch(client: &mut Client, records: &[Record]) -> Result<Vec<Outcome>, PgError> {
    Ok(apply_batch_answered(client, records)
        .await?
        .into_iter()
        .map(|answer| answer.outcome)
        .collect())
}

/// A record's outcome, and whether it is the stored answer of an earlier record with the same
/// idempotency key (a replay), possibly one earlier in the same batch.
#[derive(Clone, PartialEq, Eq, Debug)]
pub struct Answer {
    pub outcome: Outcome,
    pub replayed: bool,
}

/// [`apply_batch`], also telling which outcomes are replays.
pub async fn apply_batch_answered(
    client: &mut Client,
    records: &[Record],
) -> Result<Vec<Answer>, PgError> {
    let mut attempt = 1;
    let mut assume_new_ids_free = true;
    loop {
        match apply_once(client, records, assume_new_ids_free).await {
            Ok(Attempt::Applied(answers)) => return Ok(answers),
            Ok(Attempt::NewIdTaken) => {
                tracing::debug!("an id the batch makes is taken, applying again with it loaded");
                assume_new_ids_free = false;
            }
            Err(PgError::Postgres(error)) if attempt < ATTEMPTS_MAX && is_retryable(&error) => {
                tracing::debug!(%error, attempt, "batch conflicted, retrying");
                tokio::time::sleep(backoff(attempt)).await;
                attempt += 1;
                // A unique violation may be an id assumed free: load them all from now on.
                assume_new_ids_free = false;
            }
            Err(error) => return Err(error),
        }
    }
}

fn is_retryable(error: &tokio_postgres::Error) -> bool {
    matches!(
        error.code(),
        Some(code) if *code == SqlState::T_R_SERIALIZATION_FAILURE
            || *code == SqlState::T_R_DEADLOCK_DETECTED
            || *code == SqlState::UNIQUE_VIOLATION
    )
}

/// A few milliseconds, doubling per attempt, with full jitter.
fn backoff(attempt: u32) -> Duration {
    use std::hash::{BuildHasher, Hasher};
    let mut hasher = std::collections::hash_map::RandomState::new().build_hasher();
    hasher.write_u32(attempt);
    let ceiling_micros = 2_000u64 << attempt.min(6);
    Duration::from_micros(ceiling_micros / 4 + hasher.finish() % ceiling_micros)
}

/// How one attempt at a batch ended, short of an error.
enum Attempt {
    Applied(Vec<Answer>),
    /// An id assumed free is taken; nothing was committed.
    NewIdTaken,
}

async fn apply_once(
    client: &mut Client,
    records: &[Record],
    assume_new_ids_free: bool,
) -> Result<Attempt, PgError> {
    let started = Instant::now();
    let transaction = client.transaction().await?;
    let (mut working, assumed, last_changed) =
        load_working_set(&transaction, records, assume_new_ids_free).await?;
    // Batches commit in the order their accounts' locks are granted, which need not be the
    // order of their times (another server's clock, or a batch that took its time first and
    // then waited for these locks). A batch is given a time later than any earlier change to
    // the accounts it holds, so that lists ordered by time, and a statement's running
    // balance, follow the order of commits.
    let later: Vec<Record>;
    let records = match last_changed {
        Some(last) if records.iter().any(|record| record.now <= last) => {
            later = records
                .iter()
                .map(|record| Record {
                    now: record.now.max(Timestamp(last.0.saturating_add(1))),
                    ..record.clone()
                })
                .collect();
            &later[..]
        }
        _ => records,
    };
    let loaded = Instant::now();
    // Whether each record's command runs: a replayed or reused idempotency key answers without
    // reading anything else.
    let mut executed = Vec::with_capacity(records.len());
    let answers: Vec<Answer> = records
        .iter()
        .map(|record| {
            let lookup = record
                .idempotency
                .as_ref()
                .map(|claim| working.idempotency_lookup(&claim.key, &claim.fingerprint));
            let replayed = matches!(lookup, Some(IdempotencyLookup::Replay(_)));
            executed.push(matches!(lookup, None | Some(IdempotencyLookup::New)));
            Answer {
                outcome: working.apply(record),
                replayed,
            }
        })
        .collect();
    let changes = working.take_changes();
    let (payments, transfers) = assumed.unwritten(&working, records, &executed, &changes);
    let applied = Instant::now();
    let now = records.iter().map(|r| r.now).max().unwrap_or(Timestamp(0));
    if persist(&transaction, &changes, now, (&payments, &transfers)).await? == Persisted::NewIdTaken
    {
        // Dropping the transaction rolls it back.
        return Ok(Attempt::NewIdTaken);
    }
    let persisted = Instant::now();
    transaction.commit().await?;
    let millis = |from: Instant, to: Instant| (to - from).as_secs_f64() * 1_000.0;
    tracing::debug!(
        records = records.len(),
        load_ms = millis(started, loaded),
        apply_ms = millis(loaded, applied),
        persist_ms = millis(applied, persisted),
        commit_ms = millis(persisted, Instant::now()),
        "batch applied"
    );
    Ok(Attempt::Applied(answers))
}

// =============================================================================================
// Loading
// =============================================================================================

/// What a batch reads, gathered over rounds.
#[derive(Default)]
struct Wanted {
    operator_key: bool,
    key_hashes: BTreeSet<KeyHash>,
    merchants: BTreeSet<MerchantId>,
    payers: BTreeSet<PayerId>,
    payments: BTreeSet<PaymentId>,
    topups: BTreeSet<TopupId>,
    refunds: BTreeSet<RefundId>,
    accounts: BTreeSet<(Owner, Currency)>,
    transfers: BTreeSet<TransferId>,
    idempotency_keys: BTreeSet<IdempotencyKey>,
}

fn wanted_by(working: &State, records: &[Record]) -> Wanted {
    let mut wanted = Wanted::default();
    for record in records {
        let needs = working.needs(record);
        wanted.operator_key |= needs.operator_key;
        wanted.key_hashes.extend(needs.key_hashes);
        wanted.merchants.extend(needs.merchants);
        wanted.payers.extend(needs.payers);
        wanted.payments.extend(needs.payments);
        wanted.topups.extend(needs.topups);
        wanted.refunds.extend(needs.refunds);
        wanted.accounts.extend(needs.accounts);
        wanted.transfers.extend(needs.transfers);
        wanted.idempotency_keys.extend(needs.idempotency_keys);
    }
    wanted
}

/// What `wanted` lists beyond `asked` (accounts aside: they are locked once, at the end), and
/// adds it to `asked`.
fn take_new(wanted: &Wanted, asked: &mut Wanted) -> Wanted {
    fn new<T: Ord + Clone>(wanted: &BTreeSet<T>, asked: &mut BTreeSet<T>) -> BTreeSet<T> {
        let fresh: BTreeSet<T> = wanted.difference(asked).cloned().collect();
        asked.extend(fresh.iter().cloned());
        fresh
    }
    let operator_key = wanted.operator_key && !asked.operator_key;
    asked.operator_key |= wanted.operator_key;
    Wanted {
        operator_key,
        key_hashes: new(&wanted.key_hashes, &mut asked.key_hashes),
        merchants: new(&wanted.merchants, &mut asked.merchants),
        payers: new(&wanted.payers, &mut asked.payers),
        payments: new(&wanted.payments, &mut asked.payments),
        topups: new(&wanted.topups, &mut asked.topups),
        refunds: new(&wanted.refunds, &mut asked.refunds),
        accounts: BTreeSet::new(),
        transfers: new(&wanted.transfers, &mut asked.transfers),
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
            && self.idempotency_keys.is_empty()
    }

    /// Takes out of the loads the ids of new payments (every payment named but those refunded)
    /// and of new ledger transfers, and adds them to `assumed`.
    fn assume_free(&mut self, refunded: &BTreeSet<PaymentId>, assumed: &mut Assumed) {
        let (kept, new): (BTreeSet<PaymentId>, BTreeSet<PaymentId>) =
            std::mem::take(&mut self.payments)
                .into_iter()
                .partition(|id| refunded.contains(id));
        self.payments = kept;
        assumed.payments.extend(new);
        assumed.transfers.append(&mut self.transfers);
    }
}

/// Ids of new objects a batch names that were assumed free instead of loaded.
#[derive(Default)]
struct Assumed {
    payments: BTreeSet<PaymentId>,
    transfers: BTreeSet<TransferId>,
}

impl Assumed {
    /// The assumed ids that commands which ran may have read but that the batch does not write:
    /// they must be checked free before the commit. (A written one is checked by its unique
    /// index.)
    fn unwritten(
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
        for payment in &changes.payments {
            payments.remove(&payment.id);
        }
        for record in &changes.transfers {
            transfers.remove(&record.transfer.id);
        }
        (payments, transfers)
    }
}

/// Payments that records refund: they are loaded (and locked), never assumed new.
fn refunded_payments(records: &[Record]) -> BTreeSet<PaymentId> {
    records
        .iter()
        .filter_map(|record| match &record.command {
            Command::Refund { payment, .. } => Some(*payment),
            _ => None,
        })
        .collect()
}

/// Whether any of these payment or transfer ids is taken.
async fn any_taken(
    transaction: &Transaction<'_>,
    payments: &BTreeSet<PaymentId>,
    transfers: &BTreeSet<TransferId>,
) -> Result<bool, PgError> {
    if payments.is_empty() && transfers.is_empty() {
        return Ok(false);
    }
    let payments: Vec<Vec<u8>> = payments.iter().map(|id| id16(id.to_u128())).collect();
    let transfers: Vec<Vec<u8>> = transfers.iter().map(|id| id16(id.0)).collect();
    let row = transaction
        .query_typed_one(
            "SELECT EXISTS (SELECT 1 FROM unnest($1::BYTEA[]) AS u(id) JOIN payments USING (id))
                 OR EXISTS (SELECT 1 FROM unnest($2::BYTEA[]) AS u(id) JOIN transfers USING (id))",
            &[
                (&payments, Type::BYTEA_ARRAY),
                (&transfers, Type::BYTEA_ARRAY),
            ],
        )
        .await?;
    Ok(row.get(0))
}

/// A working set holding what `records` read, with the payments they refund and the accounts
/// they touch locked until the transaction ends. Payments are locked first, then accounts,
/// each in id order, so concurrent writers never wait on each other in a cycle.
///
/// With `assume_new_ids_free`, the ids of new payments and transfers are not loaded but
/// returned, to be checked (see [`apply_batch`]). Also returns the latest time any of the
/// accounts loaded (and locked) was changed.
async fn load_working_set(
    transaction: &Transaction<'_>,
    records: &[Record],
    assume_new_ids_free: bool,
) -> Result<(State, Assumed, Option<Timestamp>), PgError> {
    let mut working = State::new_working_set();
    let mut asked = Wanted::default();
    let mut assumed = Assumed::default();
    let refunded = if assume_new_ids_free {
        refunded_payments(records)
    } else {
        BTreeSet::new()
    };
    // A refund names only its payment: its payer and accounts are known once that is loaded.
    loop {
        let mut wanted = wanted_by(&working, records);
        if assume_new_ids_free {
            wanted.assume_free(&refunded, &mut assumed);
        }
        let fresh = take_new(&wanted, &mut asked);
        if fresh.is_empty() {
            asked.accounts = wanted.accounts;
            break;
        }
        // One round's reads, sent together; the only locks among them are the payments'.
        let (keys, merchants, payers, payments, topups, refunds, transfers, idempotency) = tokio::join!(
            biased;
            load_keys(transaction, &fresh),
            load_merchants(transaction, &fresh.merchants),
            load_payers(transaction, &fresh.payers),
            load_payments(transaction, &fresh.payments),
            load_topups(transaction, &fresh.topups),
            load_refunds(transaction, &fresh.refunds),
            load_transfers(transaction, &fresh.transfers),
            load_idempotency(transaction, &fresh),
        );
        for (hash, principal) in keys? {
            if working.principal(&hash).is_some()
                || (principal == Principal::Operator && working.has_operator_key())
            {
                continue;
            }
            loaded("a key hash", working.insert_key(hash, principal))?;
        }
        for merchant in merchants? {
            loaded("a merchant", working.insert_merchant(merchant))?;
        }
        for payer in payers? {
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
    }
    let mut last_changed = None;
    for (owner, account, changed_at) in load_accounts(transaction, &asked.accounts).await? {
        last_changed = last_changed.max(Some(changed_at));
        if working.account_of(owner, account.currency).is_some() {
            continue;
        }
        loaded("an account", working.insert_account(owner, account))?;
    }
    Ok((working, assumed, last_changed))
}

fn loaded(what: &str, result: Result<(), LoadError>) -> Result<(), PgError> {
    result.map_err(|error| PgError::Stored(format!("{what} does not load: {error:?}")))
}

async fn load_keys(
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
             SELECT key_hash, 1::SMALLINT, ''::BYTEA FROM operator_keys
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
async fn rows_by_ids(
    transaction: &Transaction<'_>,
    sql: &str,
    ids: impl Iterator<Item = u128>,
) -> Result<Vec<Row>, PgError> {
    let ids: Vec<Vec<u8>> = ids.map(id16).collect();
    if ids.is_empty() {
        return Ok(Vec::new());
    }
    Ok(transaction
        .query_typed(sql, &[(&ids, Type::BYTEA_ARRAY)])
        .await?)
}

async fn load_merchants(
    transaction: &Transaction<'_>,
    ids: &BTreeSet<MerchantId>,
) -> Result<Vec<Merchant>, PgError> {
    let rows = rows_by_ids(
        transaction,
        "SELECT id, name, fee_bps, fee_fixed::TEXT, created_at FROM merchants
             WHERE id = ANY($1)",
        ids.iter().map(|id| id.to_u128()),
    )
    .await?;
    rows.iter()
        .map(|row| {
            Ok(Merchant {
                id: MerchantId::from_u128(u128_of(row.get(0))?),
                name: row.get(1),
                fee: FeeSchedule {
                    bps: u32::try_from(row.get::<_, i32>(2)).map_err(|_| stored("fee_bps"))?,
                    fixed: Amount::from_micros(
                        row.get::<_, &str>(3)
                            .parse()
                            .map_err(|_| stored("fee_fixed"))?,
                    ),
                },
                created_at: time_of(row.get(4))?,
            })
        })
        .collect()
}

async fn load_payers(
    transaction: &Transaction<'_>,
    ids: &BTreeSet<PayerId>,
) -> Result<Vec<Payer>, PgError> {
    let rows = rows_by_ids(
        transaction,
        "SELECT id, name, created_at FROM payers WHERE id = ANY($1)",
        ids.iter().map(|id| id.to_u128()),
    )
    .await?;
    rows.iter()
        .map(|row| {
            Ok(Payer {
                id: PayerId::from_u128(u128_of(row.get(0))?),
                name: row.get(1),
                created_at: time_of(row.get(2))?,
            })
        })
        .collect()
}

/// Payments, locked: a refund changes its payment's refund totals.
async fn load_payments(
    transaction: &Transaction<'_>,
    ids: &BTreeSet<PaymentId>,
) -> Result<Vec<Payment>, PgError> {
    let rows = rows_by_ids(
        transaction,
        "SELECT id, payer, merchant, amount, currency::TEXT, fee, description, reference,
                    created_at, amount_refunded, fee_refunded
             FROM payments WHERE id = ANY($1) ORDER BY id FOR UPDATE",
        ids.iter().map(|id| id.to_u128()),
    )
    .await?;
    rows.iter()
        .map(|row| {
            Ok(Payment {
                id: PaymentId::from_u128(u128_of(row.get(0))?),
                payer: PayerId::from_u128(u128_of(row.get(1))?),
                merchant: MerchantId::from_u128(u128_of(row.get(2))?),
                amount: amount_of(row.get(3))?,
                currency: currency_of(row.get(4))?,
                fee: amount_of(row.get(5))?,
                description: row.get(6),
                reference: row.get(7),
                created_at: time_of(row.get(8))?,
                amount_refunded: amount_of(row.get(9))?,
                fee_refunded: amount_of(row.get(10))?,
            })
        })
        .collect()
}

async fn load_topups(
    transaction: &Transaction<'_>,
    ids: &BTreeSet<TopupId>,
) -> Result<Vec<Topup>, PgError> {
    let rows = rows_by_ids(
        transaction,
        "SELECT id, payer, amount, currency::TEXT, source, created_at FROM topups
             WHERE id = ANY($1)",
        ids.iter().map(|id| id.to_u128()),
    )
    .await?;
    rows.iter()
        .map(|row| {
            Ok(Topup {
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
            })
        })
        .collect()
}

async fn load_refunds(
    transaction: &Transaction<'_>,
    ids: &BTreeSet<RefundId>,
) -> Result<Vec<Refund>, PgError> {
    let rows = rows_by_ids(
        transaction,
        "SELECT id, payment, payer, merchant, amount, currency::TEXT, fee_refunded, created_at
             FROM refunds WHERE id = ANY($1)",
        ids.iter().map(|id| id.to_u128()),
    )
    .await?;
    rows.iter()
        .map(|row| {
            Ok(Refund {
                id: RefundId::from_u128(u128_of(row.get(0))?),
                payment: PaymentId::from_u128(u128_of(row.get(1))?),
                payer: PayerId::from_u128(u128_of(row.get(2))?),
                merchant: MerchantId::from_u128(u128_of(row.get(3))?),
                amount: amount_of(row.get(4))?,
                currency: currency_of(row.get(5))?,
                fee_refunded: amount_of(row.get(6))?,
                created_at: time_of(row.get(7))?,
            })
        })
        .collect()
}

async fn load_transfers(
    transaction: &Transaction<'_>,
    ids: &BTreeSet<TransferId>,
) -> Result<Vec<TransferRecord>, PgError> {
    let rows = rows_by_ids(
        transaction,
        "SELECT id, debit_account, credit_account, amount::TEXT, kind, pending_id,
                    timeout_secs, linked, outcome, hold_state, expires_at, created_at
             FROM transfers WHERE id = ANY($1)",
        ids.iter().map(|id| id.0),
    )
    .await?;
    rows.iter().map(transfer_record_of).collect()
}

pub(crate) fn transfer_record_of(row: &Row) -> Result<TransferRecord, PgError> {
    let pending_id = |row: &Row| -> Result<TransferId, PgError> {
        let bytes: Option<&[u8]> = row.get(5);
        Ok(TransferId(u128_of(
            bytes.ok_or_else(|| stored("transfers.pending_id"))?,
        )?))
    };
    let kind = match row.get::<_, i16>(4) {
        1 => TransferKind::Posted,
        2 => TransferKind::Pending {
            timeout_secs: row
                .get::<_, Option<i32>>(6)
                .ok_or_else(|| stored("transfers.timeout_secs"))? as u32,
        },
        3 => TransferKind::PostPending {
            pending_id: pending_id(row)?,
        },
        4 => TransferKind::VoidPending {
            pending_id: pending_id(row)?,
        },
        _ => return Err(stored("transfers.kind")),
    };
    let outcome = match row.get::<_, i16>(8) {
        0 => Ok(()),
        code => Err(transfer_rejection_of(code).ok_or_else(|| stored("transfers.outcome"))?),
    };
    let hold = match row.get::<_, Option<i16>>(9) {
        None => None,
        Some(1) => Some(HoldState::Pending),
        Some(2) => Some(HoldState::Posted),
        Some(3) => Some(HoldState::Voided),
        Some(4) => Some(HoldState::Expired),
        Some(_) => return Err(stored("transfers.hold_state")),
    };
    Ok(TransferRecord {
        transfer: Transfer {
            id: TransferId(u128_of(row.get(0))?),
            debit: AccountId(row.get::<_, i64>(1) as u64),
            credit: AccountId(row.get::<_, i64>(2) as u64),
            amount: Amount::from_micros(
                row.get::<_, &str>(3)
                    .parse()
                    .map_err(|_| stored("transfers.amount"))?,
            ),
            kind,
            linked: row.get(7),
        },
        timestamp: time_of(row.get(11))?,
        outcome,
        hold,
        expires_at: row.get::<_, Option<i64>>(10).map(time_of).transpose()?,
    })
}

/// Idempotency records by key, and for a prune every record made before its time.
async fn load_idempotency(
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
            "SELECT principal_kind, principal_id, key, fingerprint, outcome, created_at
             FROM idempotency_keys
             WHERE (principal_kind, principal_id, key) IN
                   (SELECT * FROM unnest($1::SMALLINT[], $2::BYTEA[], $3::TEXT[]))",
            &[
                (&kinds, Type::INT2_ARRAY),
                (&principals, Type::BYTEA_ARRAY),
                (&keys, Type::TEXT_ARRAY),
            ],
        )
        .await?;
    rows.iter()
        .map(|row| {
            let key = IdempotencyKey {
                principal: principal_of(row.get(0), row.get(1))?,
                key: row.get(2),
            };
            let outcome = decode_outcome(row.get(4))
                .map_err(|error| PgError::Stored(format!("an idempotency outcome: {error}")))?;
            Ok(IdempotencyRow {
                key,
                fingerprint: bytes32(row.get(3))?,
                outcome,
                made: time_of(row.get(5))?,
            })
        })
        .collect()
}

/// Accounts, locked in id order. A row found under another owner (a 2⁻⁶⁴ id collision) is
/// loaded under that owner, so that the command is refused as the whole state refuses it.
/// The accounts wanted that exist, locked in id order, each with the time it last changed.
async fn load_accounts(
    transaction: &Transaction<'_>,
    wanted: &BTreeSet<(Owner, Currency)>,
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
    let rows = transaction
        .query_typed(
            "SELECT id, owner_kind, owner_id, currency::TEXT, kind, debits_posted, credits_posted,
                    debits_pending, credits_pending, changed_at
             FROM accounts WHERE id = ANY($1) ORDER BY id FOR UPDATE",
            &[(&ids, Type::INT8_ARRAY)],
        )
        .await?;
    rows.iter()
        .map(|row| {
            let owner = owner_of(row.get(1), row.get(2))?;
            let account = Account {
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
            };
            Ok((owner, account, time_of(row.get(9))?))
        })
        .collect()
}

// =============================================================================================
// Persisting
// =============================================================================================

/// Whether [`persist`] wrote the change set.
#[derive(PartialEq, Eq, Debug)]
enum Persisted {
    Written,
    /// One of the unwritten ids assumed free is taken: the rows sent in bulk were not.
    NewIdTaken,
}

/// Writes a change set, after checking that the `unwritten` ids assumed free are: first one
/// statement per table (and the check), all sent together, then the large tables' rows with
/// `COPY`, one table at a time. Only the statements on one table depend on each other's order
/// (the operator's key, and a prune before new idempotency records), and each such pair is
/// sent in order.
async fn persist(
    transaction: &Transaction<'_>,
    changes: &Changes,
    now: Timestamp,
    unwritten: (&BTreeSet<PaymentId>, &BTreeSet<TransferId>),
) -> Result<Persisted, PgError> {
    let key_of: HashMap<Principal, &KeyHash> = changes
        .keys
        .iter()
        .filter_map(|(hash, principal)| principal.map(|p| (p, hash)))
        .collect();
    let (
        keys,
        merchants,
        payers,
        accounts,
        topups,
        payments,
        refunded,
        refunds,
        entries,
        transfers,
        idempotency,
        taken,
        copies,
    ) = tokio::join!(
        biased;
        persist_keys(transaction, changes, now),
        persist_merchants(transaction, changes, &key_of),
        persist_payers(transaction, changes, &key_of),
        persist_accounts(transaction, changes, now),
        persist_topups(transaction, changes),
        persist_payments(transaction, changes),
        persist_payments_refunded(transaction, changes),
        persist_refunds(transaction, changes),
        persist_entries(transaction, changes),
        persist_transfers(transaction, &changes.transfers),
        persist_idempotency(transaction, changes),
        any_taken(transaction, unwritten.0, unwritten.1),
        prepare_copies(transaction, changes),
    );
    let mut new_id_taken = false;
    let mut prepared = Vec::new();
    first_error([
        keys,
        merchants,
        payers,
        accounts,
        topups,
        payments,
        refunded,
        refunds,
        entries,
        transfers,
        idempotency,
        taken.map(|taken| new_id_taken = taken),
        copies.map(|copies| prepared = copies),
    ])?;
    if new_id_taken {
        return Ok(Persisted::NewIdTaken);
    }
    // One at a time, and only once everything before succeeded: a `COPY` sent into a failed
    // transaction leaves the driver out of step with the server.
    for (statement, rows) in prepared {
        copy_in(transaction, &statement, rows).await?;
    }
    Ok(Persisted::Written)
}

/// The error that caused the others: statements sent together after a failed one fail only
/// because the transaction is aborted, and the order they were sent in is not the order
/// written here.
fn first_error<const N: usize>(results: [Result<(), PgError>; N]) -> Result<(), PgError> {
    let aborted = |error: &PgError| matches!(error, PgError::Postgres(e) if e.code() == Some(&SqlState::IN_FAILED_SQL_TRANSACTION));
    let mut first = None;
    for result in results {
        match result {
            Ok(()) => {}
            Err(error) if !aborted(&error) => return Err(error),
            Err(error) => {
                first.get_or_insert(error);
            }
        }
    }
    first.map_or(Ok(()), Err)
}

fn key_for(
    key_of: &HashMap<Principal, &KeyHash>,
    principal: Principal,
) -> Result<Vec<u8>, PgError> {
    key_of
        .get(&principal)
        .map(|hash| hash.0.to_vec())
        .ok_or_else(|| PgError::Stored(format!("no key hash for new {principal:?}")))
}

async fn persist_merchants(
    transaction: &Transaction<'_>,
    changes: &Changes,
    key_of: &HashMap<Principal, &KeyHash>,
) -> Result<(), PgError> {
    if changes.merchants.is_empty() {
        return Ok(());
    }
    let mut ids = Vec::new();
    let mut names = Vec::new();
    let mut hashes = Vec::new();
    let mut bps = Vec::new();
    let mut fixed = Vec::new();
    let mut created = Vec::new();
    for merchant in &changes.merchants {
        ids.push(id16(merchant.id.to_u128()));
        names.push(merchant.name.as_str());
        hashes.push(key_for(key_of, Principal::Merchant(merchant.id))?);
        bps.push(i32::try_from(merchant.fee.bps).map_err(|_| stored("fee_bps"))?);
        fixed.push(merchant.fee.fixed.micros().to_string());
        created.push(big("a time", merchant.created_at.0)?);
    }
    transaction
        .execute_typed(
            "INSERT INTO merchants (id, name, key_hash, fee_bps, fee_fixed, created_at)
             SELECT id, name, key_hash, fee_bps, fee_fixed::NUMERIC, created_at
             FROM unnest($1::BYTEA[], $2::TEXT[], $3::BYTEA[], $4::INTEGER[], $5::TEXT[],
                         $6::BIGINT[])
                  AS u(id, name, key_hash, fee_bps, fee_fixed, created_at)",
            &[
                (&ids, Type::BYTEA_ARRAY),
                (&names, Type::TEXT_ARRAY),
                (&hashes, Type::BYTEA_ARRAY),
                (&bps, Type::INT4_ARRAY),
                (&fixed, Type::TEXT_ARRAY),
                (&created, Type::INT8_ARRAY),
            ],
        )
        .await?;
    Ok(())
}

async fn persist_payers(
    transaction: &Transaction<'_>,
    changes: &Changes,
    key_of: &HashMap<Principal, &KeyHash>,
) -> Result<(), PgError> {
    if changes.payers.is_empty() {
        return Ok(());
    }
    let mut ids = Vec::new();
    let mut names = Vec::new();
    let mut hashes = Vec::new();
    let mut created = Vec::new();
    for payer in &changes.payers {
        ids.push(id16(payer.id.to_u128()));
        names.push(payer.name.as_str());
        hashes.push(key_for(key_of, Principal::Payer(payer.id))?);
        created.push(big("a time", payer.created_at.0)?);
    }
    transaction
        .execute_typed(
            "INSERT INTO payers (id, name, key_hash, created_at)
             SELECT * FROM unnest($1::BYTEA[], $2::TEXT[], $3::BYTEA[], $4::BIGINT[])",
            &[
                (&ids, Type::BYTEA_ARRAY),
                (&names, Type::TEXT_ARRAY),
                (&hashes, Type::BYTEA_ARRAY),
                (&created, Type::INT8_ARRAY),
            ],
        )
        .await?;
    Ok(())
}

async fn persist_topups(transaction: &Transaction<'_>, changes: &Changes) -> Result<(), PgError> {
    if changes.topups.is_empty() {
        return Ok(());
    }
    let mut c = Columns::default();
    for topup in &changes.topups {
        c.id.push(id16(topup.id.to_u128()));
        c.payer.push(id16(topup.payer.to_u128()));
        c.amount.push(big("an amount", topup.amount.micros())?);
        c.currency.push(topup.currency.as_str().to_string());
        c.small.push(match topup.source {
            FundingSource::Sandbox => 1,
            FundingSource::SandboxDecline => 2,
        });
        c.created.push(big("a time", topup.created_at.0)?);
    }
    transaction
        .execute_typed(
            "INSERT INTO topups (id, payer, amount, currency, source, created_at)
             SELECT * FROM unnest($1::BYTEA[], $2::BYTEA[], $3::BIGINT[], $4::TEXT[],
                                  $5::SMALLINT[], $6::BIGINT[])",
            &[
                (&c.id, Type::BYTEA_ARRAY),
                (&c.payer, Type::BYTEA_ARRAY),
                (&c.amount, Type::INT8_ARRAY),
                (&c.currency, Type::TEXT_ARRAY),
                (&c.small, Type::INT2_ARRAY),
                (&c.created, Type::INT8_ARRAY),
            ],
        )
        .await?;
    Ok(())
}

async fn persist_payments(transaction: &Transaction<'_>, changes: &Changes) -> Result<(), PgError> {
    let payments = &changes.payments;
    if payments.is_empty() {
        return Ok(());
    }
    if payments.len() >= COPY_ROWS_MIN {
        return Ok(());
    }
    let positions = batch_positions(payments.len())?;
    let mut c = Columns::default();
    let mut description = Vec::new();
    let mut reference = Vec::new();
    for payment in payments {
        c.id.push(id16(payment.id.to_u128()));
        c.payer.push(id16(payment.payer.to_u128()));
        c.merchant.push(id16(payment.merchant.to_u128()));
        c.amount.push(big("an amount", payment.amount.micros())?);
        c.currency.push(payment.currency.as_str().to_string());
        c.fee.push(big("a fee", payment.fee.micros())?);
        description.push(payment.description.as_deref());
        reference.push(payment.reference.as_deref());
        c.created.push(big("a time", payment.created_at.0)?);
        c.amount2
            .push(big("an amount", payment.amount_refunded.micros())?);
        c.fee2.push(big("a fee", payment.fee_refunded.micros())?);
    }
    transaction
        .execute_typed(
            "INSERT INTO payments (id, payer, merchant, amount, currency, fee, description,
                                   reference, created_at, amount_refunded, fee_refunded,
                                   batch_position)
             SELECT * FROM unnest($1::BYTEA[], $2::BYTEA[], $3::BYTEA[], $4::BIGINT[],
                                  $5::TEXT[], $6::BIGINT[], $7::TEXT[], $8::TEXT[],
                                  $9::BIGINT[], $10::BIGINT[], $11::BIGINT[],
                                  $12::INTEGER[])",
            &[
                (&c.id, Type::BYTEA_ARRAY),
                (&c.payer, Type::BYTEA_ARRAY),
                (&c.merchant, Type::BYTEA_ARRAY),
                (&c.amount, Type::INT8_ARRAY),
                (&c.currency, Type::TEXT_ARRAY),
                (&c.fee, Type::INT8_ARRAY),
                (&description, Type::TEXT_ARRAY),
                (&reference, Type::TEXT_ARRAY),
                (&c.created, Type::INT8_ARRAY),
                (&c.amount2, Type::INT8_ARRAY),
                (&c.fee2, Type::INT8_ARRAY),
                (&positions, Type::INT4_ARRAY),
            ],
        )
        .await?;
    Ok(())
}

async fn persist_payments_refunded(
    transaction: &Transaction<'_>,
    changes: &Changes,
) -> Result<(), PgError> {
    if changes.payments_refunded.is_empty() {
        return Ok(());
    }
    let mut c = Columns::default();
    for change in &changes.payments_refunded {
        c.id.push(id16(change.id.to_u128()));
        c.amount
            .push(big("an amount", change.amount_refunded.micros())?);
        c.fee.push(big("a fee", change.fee_refunded.micros())?);
    }
    transaction
        .execute_typed(
            "UPDATE payments SET amount_refunded = u.amount_refunded,
                                 fee_refunded = u.fee_refunded
             FROM unnest($1::BYTEA[], $2::BIGINT[], $3::BIGINT[])
                  AS u(id, amount_refunded, fee_refunded)
             WHERE payments.id = u.id",
            &[
                (&c.id, Type::BYTEA_ARRAY),
                (&c.amount, Type::INT8_ARRAY),
                (&c.fee, Type::INT8_ARRAY),
            ],
        )
        .await?;
    Ok(())
}

async fn persist_refunds(transaction: &Transaction<'_>, changes: &Changes) -> Result<(), PgError> {
    if changes.refunds.is_empty() {
        return Ok(());
    }
    let mut c = Columns::default();
    for refund in &changes.refunds {
        c.id.push(id16(refund.id.to_u128()));
        c.id2.push(id16(refund.payment.to_u128()));
        c.payer.push(id16(refund.payer.to_u128()));
        c.merchant.push(id16(refund.merchant.to_u128()));
        c.amount.push(big("an amount", refund.amount.micros())?);
        c.currency.push(refund.currency.as_str().to_string());
        c.fee.push(big("a fee", refund.fee_refunded.micros())?);
        c.created.push(big("a time", refund.created_at.0)?);
    }
    transaction
        .execute_typed(
            "INSERT INTO refunds (id, payment, payer, merchant, amount, currency,
                                  fee_refunded, created_at)
             SELECT * FROM unnest($1::BYTEA[], $2::BYTEA[], $3::BYTEA[], $4::BYTEA[],
                                  $5::BIGINT[], $6::TEXT[], $7::BIGINT[], $8::BIGINT[])",
            &[
                (&c.id, Type::BYTEA_ARRAY),
                (&c.id2, Type::BYTEA_ARRAY),
                (&c.payer, Type::BYTEA_ARRAY),
                (&c.merchant, Type::BYTEA_ARRAY),
                (&c.amount, Type::INT8_ARRAY),
                (&c.currency, Type::TEXT_ARRAY),
                (&c.fee, Type::INT8_ARRAY),
                (&c.created, Type::INT8_ARRAY),
            ],
        )
        .await?;
    Ok(())
}

/// Statement lines, with their place among the lines the batch made.
async fn persist_entries(transaction: &Transaction<'_>, changes: &Changes) -> Result<(), PgError> {
    let entries = &changes.entries;
    if entries.is_empty() {
        return Ok(());
    }
    if entries.len() >= COPY_ROWS_MIN {
        return Ok(());
    }
    let positions = batch_positions(entries.len())?;
    let mut c = Columns::default();
    let mut credit = Vec::new();
    for (payer, entry) in entries {
        let (kind, id) = entry_object_columns(entry.object);
        c.payer.push(id16(payer.to_u128()));
        c.id.push(id16(id));
        c.small.push(kind);
        c.currency.push(entry.currency.as_str().to_string());
        credit.push(entry.credit);
        c.amount.push(big("an amount", entry.amount.micros())?);
        c.amount2
            .push(big("a balance", entry.balance_after.micros())?);
        c.created.push(big("a time", entry.created_at.0)?);
    }
    transaction
        .execute_typed(
            "INSERT INTO statement_lines (payer, object_id, object_kind, currency, credit,
                                          amount, balance_after, created_at, batch_position)
             SELECT * FROM unnest($1::BYTEA[], $2::BYTEA[], $3::SMALLINT[], $4::TEXT[],
                                  $5::BOOLEAN[], $6::BIGINT[], $7::BIGINT[], $8::BIGINT[],
                                  $9::INTEGER[])",
            &[
                (&c.payer, Type::BYTEA_ARRAY),
                (&c.id, Type::BYTEA_ARRAY),
                (&c.small, Type::INT2_ARRAY),
                (&c.currency, Type::TEXT_ARRAY),
                (&credit, Type::BOOL_ARRAY),
                (&c.amount, Type::INT8_ARRAY),
                (&c.amount2, Type::INT8_ARRAY),
                (&c.created, Type::INT8_ARRAY),
                (&positions, Type::INT4_ARRAY),
            ],
        )
        .await?;
    Ok(())
}

/// Prunes, then the new idempotency records (a key pruned and used again in one batch is new).
async fn persist_idempotency(
    transaction: &Transaction<'_>,
    changes: &Changes,
) -> Result<(), PgError> {
    if let Some(before) = changes.prunes.iter().max() {
        transaction
            .execute_typed(
                "DELETE FROM idempotency_keys WHERE created_at < $1",
                &[(&big("a prune time", before.0)?, Type::INT8)],
            )
            .await?;
    }
    if changes.idempotency.is_empty() {
        return Ok(());
    }
    let mut kinds = Vec::new();
    let mut principals = Vec::new();
    let mut keys = Vec::new();
    let mut fingerprints = Vec::new();
    let mut outcomes = Vec::new();
    let mut created = Vec::new();
    for row in &changes.idempotency {
        let (kind, id) = principal_columns(row.key.principal);
        kinds.push(kind);
        principals.push(id);
        keys.push(row.key.key.as_str());
        fingerprints.push(row.fingerprint.as_slice());
        let mut outcome = Vec::new();
        encode_outcome(&row.outcome, &mut outcome);
        outcomes.push(outcome);
        created.push(big("a time", row.made.0)?);
    }
    transaction
        .execute_typed(
            "INSERT INTO idempotency_keys (principal_kind, principal_id, key, fingerprint,
                                           outcome, created_at)
             SELECT * FROM unnest($1::SMALLINT[], $2::BYTEA[], $3::TEXT[], $4::BYTEA[],
                                  $5::BYTEA[], $6::BIGINT[])",
            &[
                (&kinds, Type::INT2_ARRAY),
                (&principals, Type::BYTEA_ARRAY),
                (&keys, Type::TEXT_ARRAY),
                (&fingerprints, Type::BYTEA_ARRAY),
                (&outcomes, Type::BYTEA_ARRAY),
                (&created, Type::INT8_ARRAY),
            ],
        )
        .await?;
    Ok(())
}

/// A statement line's `object_kind` (1 top-up, 2 payment, 3 refund) and `object_id`.
fn entry_object_columns(object: EntryObject) -> (i16, u128) {
    match object {
        EntryObject::Topup(id) => (1, id.to_u128()),
        EntryObject::Payment(id) => (2, id.to_u128()),
        EntryObject::Refund(id) => (3, id.to_u128()),
    }
}

/// `batch_position` for `count` rows in the order a batch made them: 0, 1, 2, …
fn batch_positions(count: usize) -> Result<Vec<i32>, PgError> {
    let count = i32::try_from(count)
        .map_err(|_| PgError::Stored("a batch position does not fit INTEGER".into()))?;
    Ok((0..count).collect())
}

/// Column vectors shared by the set-based inserts.
#[derive(Default)]
struct Columns {
    id: Vec<Vec<u8>>,
    id2: Vec<Vec<u8>>,
    payer: Vec<Vec<u8>>,
    merchant: Vec<Vec<u8>>,
    amount: Vec<i64>,
    amount2: Vec<i64>,
    fee: Vec<i64>,
    fee2: Vec<i64>,
    currency: Vec<String>,
    small: Vec<i16>,
    created: Vec<i64>,
}

/// Rows in the binary `COPY` format: a header, then each row as its field count and each field
/// as its length and its bytes in the type's binary form, then a trailer.
struct CopyRows {
    buf: BytesMut,
    fields: i16,
}

impl CopyRows {
    fn new(fields: i16, capacity: usize) -> CopyRows {
        let mut buf = BytesMut::with_capacity(capacity + 32);
        buf.put_slice(b"PGCOPY\n\xff\r\n\0");
        buf.put_i32(0); // flags
        buf.put_i32(0); // header extension length
        CopyRows { buf, fields }
    }

    fn row(&mut self) {
        self.buf.put_i16(self.fields);
    }

    /// BYTEA: an object id, 16 bytes big-endian.
    fn id(&mut self, id: u128) {
        self.buf.put_i32(16);
        self.buf.put_u128(id);
    }

    fn int8(&mut self, value: i64) {
        self.buf.put_i32(8);
        self.buf.put_i64(value);
    }

    fn int4(&mut self, value: i32) {
        self.buf.put_i32(4);
        self.buf.put_i32(value);
    }

    fn int2(&mut self, value: i16) {
        self.buf.put_i32(2);
        self.buf.put_i16(value);
    }

    fn bool(&mut self, value: bool) {
        self.buf.put_i32(1);
        self.buf.put_u8(u8::from(value));
    }

    /// TEXT or CHAR(n), in the database's encoding (UTF-8).
    fn text(&mut self, value: &str) {
        self.buf.put_i32(value.len() as i32);
        self.buf.put_slice(value.as_bytes());
    }

    fn optional_text(&mut self, value: Option<&str>) {
        match value {
            Some(value) => self.text(value),
            None => self.null(),
        }
    }

    fn null(&mut self) {
        self.buf.put_i32(-1);
    }

    /// NUMERIC: a non-negative integer as base-10,000 digits, most significant first.
    fn numeric(&mut self, value: u64) {
        let mut digits = [0i16; 5];
        let mut count = 0;
        let mut rest = value;
        while rest > 0 {
            digits[count] = (rest % 10_000) as i16;
            rest /= 10_000;
            count += 1;
        }
        self.buf.put_i32(8 + 2 * count as i32);
        self.buf.put_i16(count as i16); // ndigits
        self.buf.put_i16(count.saturating_sub(1) as i16); // weight
        self.buf.put_u16(0); // sign: positive
        self.buf.put_u16(0); // dscale
        for digit in digits[..count].iter().rev() {
            self.buf.put_i16(*digit);
        }
    }

    fn finish(mut self) -> Bytes {
        self.buf.put_i16(-1);
        self.buf.freeze()
    }
}

/// Runs a prepared `COPY … FROM STDIN (FORMAT binary)` with `rows`.
async fn copy_in(
    transaction: &Transaction<'_>,
    statement: &Statement,
    rows: Bytes,
) -> Result<(), PgError> {
    let sink = transaction.copy_in(statement).await?;
    let mut sink = std::pin::pin!(sink);
    sink.as_mut().send(rows).await?;
    sink.as_mut().finish().await?;
    Ok(())
}

/// The new rows of the tables that get many, encoded for `COPY`, with their statements
/// prepared (together).
async fn prepare_copies(
    transaction: &Transaction<'_>,
    changes: &Changes,
) -> Result<Vec<(Statement, Bytes)>, PgError> {
    let mut copies = Vec::new();
    if changes.payments.len() >= COPY_ROWS_MIN {
        copies.push(copy_payments(&changes.payments)?);
    }
    if changes.entries.len() >= COPY_ROWS_MIN {
        copies.push(copy_entries(&changes.entries)?);
    }
    if changes.transfers.len() >= COPY_ROWS_MIN {
        copies.push(copy_transfers(&changes.transfers)?);
    }
    let statements =
        futures_util::future::try_join_all(copies.iter().map(|(sql, _)| transaction.prepare(sql)))
            .await?;
    Ok(statements
        .into_iter()
        .zip(copies.into_iter().map(|(_, rows)| rows.finish()))
        .collect())
}

fn copy_payments(payments: &[Payment]) -> Result<(&'static str, CopyRows), PgError> {
    let positions = batch_positions(payments.len())?;
    let mut rows = CopyRows::new(12, payments.len() * 160);
    for (payment, position) in payments.iter().zip(positions) {
        rows.row();
        rows.id(payment.id.to_u128());
        rows.id(payment.payer.to_u128());
        rows.id(payment.merchant.to_u128());
        rows.int8(big("an amount", payment.amount.micros())?);
        rows.text(payment.currency.as_str());
        rows.int8(big("a fee", payment.fee.micros())?);
        rows.optional_text(payment.description.as_deref());
        rows.optional_text(payment.reference.as_deref());
        rows.int8(big("a time", payment.created_at.0)?);
        rows.int8(big("an amount", payment.amount_refunded.micros())?);
        rows.int8(big("a fee", payment.fee_refunded.micros())?);
        rows.int4(position);
    }
    Ok((
        "COPY payments (id, payer, merchant, amount, currency, fee, description, reference,
                        created_at, amount_refunded, fee_refunded, batch_position)
         FROM STDIN (FORMAT binary)",
        rows,
    ))
}

fn copy_entries(entries: &[(PayerId, Entry)]) -> Result<(&'static str, CopyRows), PgError> {
    let positions = batch_positions(entries.len())?;
    let mut rows = CopyRows::new(9, entries.len() * 120);
    for ((payer, entry), position) in entries.iter().zip(positions) {
        let (kind, id) = entry_object_columns(entry.object);
        rows.row();
        rows.id(payer.to_u128());
        rows.id(id);
        rows.int2(kind);
        rows.text(entry.currency.as_str());
        rows.bool(entry.credit);
        rows.int8(big("an amount", entry.amount.micros())?);
        rows.int8(big("a balance", entry.balance_after.micros())?);
        rows.int8(big("a time", entry.created_at.0)?);
        rows.int4(position);
    }
    Ok((
        "COPY statement_lines (payer, object_id, object_kind, currency, credit, amount,
                               balance_after, created_at, batch_position)
         FROM STDIN (FORMAT binary)",
        rows,
    ))
}

fn copy_transfers(records: &[TransferRecord]) -> Result<(&'static str, CopyRows), PgError> {
    let mut rows = CopyRows::new(12, records.len() * 120);
    for record in records {
        let transfer = &record.transfer;
        let (kind, pending, timeout) = transfer_kind_columns(transfer.kind);
        rows.row();
        rows.id(transfer.id.0);
        rows.int8(transfer.debit.0 as i64);
        rows.int8(transfer.credit.0 as i64);
        rows.numeric(transfer.amount.micros());
        rows.int2(kind);
        match pending {
            Some(id) => rows.id(id),
            None => rows.null(),
        }
        match timeout {
            Some(timeout) => rows.int4(timeout),
            None => rows.null(),
        }
        rows.bool(transfer.linked);
        rows.int2(outcome_column(record.outcome));
        match hold_column(record.hold) {
            Some(hold) => rows.int2(hold),
            None => rows.null(),
        }
        match record.expires_at {
            Some(at) => rows.int8(big("an expiry", at.0)?),
            None => rows.null(),
        }
        rows.int8(big("a time", record.timestamp.0)?);
    }
    Ok((
        "COPY transfers (id, debit_account, credit_account, amount, kind, pending_id,
                         timeout_secs, linked, outcome, hold_state, expires_at, created_at)
         FROM STDIN (FORMAT binary)",
        rows,
    ))
}

/// The operator's key: every touched hash leaves `operator_keys`, then the one that is the
/// operator's now goes in (merchants' and payers' keys go in with their rows).
async fn persist_keys(
    transaction: &Transaction<'_>,
    changes: &Changes,
    now: Timestamp,
) -> Result<(), PgError> {
    if changes.operator_key.is_none() && changes.keys.iter().all(|(_, p)| p.is_some()) {
        return Ok(());
    }
    let touched: Vec<&[u8]> = changes
        .keys
        .iter()
        .map(|(hash, _)| hash.0.as_slice())
        .collect();
    transaction
        .execute_typed(
            "DELETE FROM operator_keys WHERE key_hash = ANY($1)",
            &[(&touched, Type::BYTEA_ARRAY)],
        )
        .await?;
    let operator: Vec<&[u8]> = changes
        .keys
        .iter()
        .filter(|(_, principal)| *principal == Some(Principal::Operator))
        .map(|(hash, _)| hash.0.as_slice())
        .collect();
    if !operator.is_empty() {
        transaction
            .execute_typed(
                "INSERT INTO operator_keys (key_hash, created_at)
                 SELECT key_hash, $2 FROM unnest($1::BYTEA[]) AS u(key_hash)",
                &[
                    (&operator, Type::BYTEA_ARRAY),
                    (&big("a time", now.0)?, Type::INT8),
                ],
            )
            .await?;
    }
    Ok(())
}

async fn persist_accounts(
    transaction: &Transaction<'_>,
    changes: &Changes,
    now: Timestamp,
) -> Result<(), PgError> {
    let now = big("a time", now.0)?;
    if !changes.accounts_created.is_empty() {
        let mut ids = Vec::new();
        let mut owner_kinds = Vec::new();
        let mut owner_ids = Vec::new();
        let mut currencies = Vec::new();
        let mut kinds = Vec::new();
        let mut totals: [Vec<i64>; 4] = Default::default();
        for (owner, account) in &changes.accounts_created {
            let (owner_kind, owner_id) = owner_columns(*owner);
            ids.push(account.id.0 as i64);
            owner_kinds.push(owner_kind);
            owner_ids.push(owner_id);
            currencies.push(account.currency.as_str());
            kinds.push(i16::from(account.kind.to_u8()));
            for (column, value) in totals.iter_mut().zip(account_totals(account)) {
                column.push(big("a total", value)?);
            }
        }
        transaction
            .execute_typed(
                "INSERT INTO accounts (id, owner_kind, owner_id, currency, kind, debits_posted,
                                       credits_posted, debits_pending, credits_pending, changed_at)
                 SELECT *, $10::BIGINT FROM unnest($1::BIGINT[], $2::SMALLINT[], $3::BYTEA[],
                                      $4::TEXT[], $5::SMALLINT[], $6::BIGINT[], $7::BIGINT[],
                                      $8::BIGINT[], $9::BIGINT[])",
                &[
                    (&ids, Type::INT8_ARRAY),
                    (&owner_kinds, Type::INT2_ARRAY),
                    (&owner_ids, Type::BYTEA_ARRAY),
                    (&currencies, Type::TEXT_ARRAY),
                    (&kinds, Type::INT2_ARRAY),
                    (&totals[0], Type::INT8_ARRAY),
                    (&totals[1], Type::INT8_ARRAY),
                    (&totals[2], Type::INT8_ARRAY),
                    (&totals[3], Type::INT8_ARRAY),
                    (&now, Type::INT8),
                ],
            )
            .await?;
    }
    if !changes.account_totals.is_empty() {
        let mut ids = Vec::new();
        let mut totals: [Vec<i64>; 4] = Default::default();
        for account in &changes.account_totals {
            ids.push(account.id.0 as i64);
            for (column, value) in totals.iter_mut().zip(account_totals(account)) {
                column.push(big("a total", value)?);
            }
        }
        transaction
            .execute_typed(
                "UPDATE accounts SET debits_posted = u.dp, credits_posted = u.cp,
                                     debits_pending = u.dpe, credits_pending = u.cpe,
                                     changed_at = $6
                 FROM unnest($1::BIGINT[], $2::BIGINT[], $3::BIGINT[], $4::BIGINT[],
                             $5::BIGINT[]) AS u(id, dp, cp, dpe, cpe)
                 WHERE accounts.id = u.id",
                &[
                    (&ids, Type::INT8_ARRAY),
                    (&totals[0], Type::INT8_ARRAY),
                    (&totals[1], Type::INT8_ARRAY),
                    (&totals[2], Type::INT8_ARRAY),
                    (&totals[3], Type::INT8_ARRAY),
                    (&now, Type::INT8),
                ],
            )
            .await?;
    }
    Ok(())
}

fn account_totals(account: &Account) -> [u64; 4] {
    [
        account.debits_posted,
        account.credits_posted,
        account.debits_pending,
        account.credits_pending,
    ]
}

/// A transfer's `kind`, `pending_id` and `timeout_secs` columns.
fn transfer_kind_columns(kind: TransferKind) -> (i16, Option<u128>, Option<i32>) {
    match kind {
        TransferKind::Posted => (1, None, None),
        TransferKind::Pending { timeout_secs } => (2, None, Some(timeout_secs as i32)),
        TransferKind::PostPending { pending_id } => (3, Some(pending_id.0), None),
        TransferKind::VoidPending { pending_id } => (4, Some(pending_id.0), None),
    }
}

fn hold_column(hold: Option<HoldState>) -> Option<i16> {
    hold.map(|hold| match hold {
        HoldState::Pending => 1,
        HoldState::Posted => 2,
        HoldState::Voided => 3,
        HoldState::Expired => 4,
    })
}

fn outcome_column(outcome: Result<(), TransferRejection>) -> i16 {
    match outcome {
        Ok(()) => 0,
        Err(rejection) => transfer_rejection_code(rejection),
    }
}

async fn persist_transfers(
    transaction: &Transaction<'_>,
    records: &[TransferRecord],
) -> Result<(), PgError> {
    if records.is_empty() {
        return Ok(());
    }
    if records.len() >= COPY_ROWS_MIN {
        return Ok(());
    }
    let mut ids = Vec::new();
    let mut debits = Vec::new();
    let mut credits = Vec::new();
    let mut amounts = Vec::new();
    let mut kinds = Vec::new();
    let mut pending_ids: Vec<Option<Vec<u8>>> = Vec::new();
    let mut timeouts: Vec<Option<i32>> = Vec::new();
    let mut linked = Vec::new();
    let mut outcomes = Vec::new();
    let mut holds: Vec<Option<i16>> = Vec::new();
    let mut expires: Vec<Option<i64>> = Vec::new();
    let mut created = Vec::new();
    for record in records {
        let transfer = &record.transfer;
        let (kind, pending, timeout) = transfer_kind_columns(transfer.kind);
        ids.push(id16(transfer.id.0));
        debits.push(transfer.debit.0 as i64);
        credits.push(transfer.credit.0 as i64);
        amounts.push(transfer.amount.micros().to_string());
        kinds.push(kind);
        pending_ids.push(pending.map(id16));
        timeouts.push(timeout);
        linked.push(transfer.linked);
        outcomes.push(outcome_column(record.outcome));
        holds.push(hold_column(record.hold));
        expires.push(
            record
                .expires_at
                .map(|t| big("an expiry", t.0))
                .transpose()?,
        );
        created.push(big("a time", record.timestamp.0)?);
    }
    transaction
        .execute_typed(
            "INSERT INTO transfers (id, debit_account, credit_account, amount, kind, pending_id,
                                    timeout_secs, linked, outcome, hold_state, expires_at,
                                    created_at)
             SELECT id, debit_account, credit_account, amount::NUMERIC, kind, pending_id,
                    timeout_secs, linked, outcome, hold_state, expires_at, created_at
             FROM unnest($1::BYTEA[], $2::BIGINT[], $3::BIGINT[], $4::TEXT[], $5::SMALLINT[],
                         $6::BYTEA[], $7::INTEGER[], $8::BOOLEAN[], $9::SMALLINT[],
                         $10::SMALLINT[], $11::BIGINT[], $12::BIGINT[])
                  AS u(id, debit_account, credit_account, amount, kind, pending_id,
                       timeout_secs, linked, outcome, hold_state, expires_at, created_at)",
            &[
                (&ids, Type::BYTEA_ARRAY),
                (&debits, Type::INT8_ARRAY),
                (&credits, Type::INT8_ARRAY),
                (&amounts, Type::TEXT_ARRAY),
                (&kinds, Type::INT2_ARRAY),
                (&pending_ids, Type::BYTEA_ARRAY),
                (&timeouts, Type::INT4_ARRAY),
                (&linked, Type::BOOL_ARRAY),
                (&outcomes, Type::INT2_ARRAY),
                (&holds, Type::INT2_ARRAY),
                (&expires, Type::INT8_ARRAY),
                (&created, Type::INT8_ARRAY),
            ],
        )
        .await?;
    Ok(())
}

// =============================================================================================
// Stored forms
// =============================================================================================

const TRANSFER_REJECTIONS: [TransferRejection; 17] = [
    TransferRejection::LinkedEventFailed,
    TransferRejection::LinkedEventChainOpen,
    TransferRejection::IdMustNotBeZero,
    TransferRejection::ExistsWithDifferentFields,
    TransferRejection::AccountsMustBeDifferent,
    TransferRejection::AmountMustNotBeZero,
    TransferRejection::PendingTransferNotFound,
    TransferRejection::PendingTransferAlreadyPosted,
    TransferRejection::PendingTransferAlreadyVoided,
    TransferRejection::PendingTransferExpired,
    TransferRejection::PendingTransferHasDifferentAccounts,
    TransferRejection::ExceedsPendingAmount,
    TransferRejection::DebitAccountNotFound,
    TransferRejection::CreditAccountNotFound,
    TransferRejection::CurrenciesMustMatch,
    TransferRejection::Overflow,
    TransferRejection::ExceedsAvailableBalance,
];

/// A transfer's stored outcome: 1 + its place in the ledger's list of rejections (0 is
/// applied). These codes never change meaning.
fn transfer_rejection_code(rejection: TransferRejection) -> i16 {
    let index = TRANSFER_REJECTIONS
        .iter()
        .position(|r| *r == rejection)
        .expect("every rejection is listed");
    index as i16 + 1
}

fn transfer_rejection_of(code: i16) -> Option<TransferRejection> {
    let index = usize::try_from(code).ok()?.checked_sub(1)?;
    TRANSFER_REJECTIONS.get(index).copied()
}

pub(crate) fn stored(what: &str) -> PgError {
    PgError::Stored(format!("{what} is out of range"))
}

pub(crate) fn id16(value: u128) -> Vec<u8> {
    value.to_be_bytes().to_vec()
}

pub(crate) fn u128_of(bytes: &[u8]) -> Result<u128, PgError> {
    let bytes: [u8; 16] = bytes.try_into().map_err(|_| stored("an id"))?;
    Ok(u128::from_be_bytes(bytes))
}

pub(crate) fn bytes32(bytes: &[u8]) -> Result<[u8; 32], PgError> {
    bytes.try_into().map_err(|_| stored("a hash"))
}

fn big(what: &str, value: u64) -> Result<i64, PgError> {
    i64::try_from(value).map_err(|_| PgError::Stored(format!("{what} does not fit BIGINT")))
}

pub(crate) fn total_of(value: i64) -> Result<u64, PgError> {
    u64::try_from(value).map_err(|_| stored("an account total"))
}

pub(crate) fn amount_of(value: i64) -> Result<Amount, PgError> {
    Ok(Amount::from_micros(
        u64::try_from(value).map_err(|_| stored("an amount"))?,
    ))
}

pub(crate) fn time_of(value: i64) -> Result<Timestamp, PgError> {
    Ok(Timestamp(
        u64::try_from(value).map_err(|_| stored("a time"))?,
    ))
}

pub(crate) fn currency_of(code: String) -> Result<Currency, PgError> {
    Currency::parse(&code).ok_or_else(|| stored("a currency"))
}

/// `principal_kind`: 1 operator (empty id), 2 merchant, 3 payer.
pub(crate) fn principal_columns(principal: Principal) -> (i16, Vec<u8>) {
    match principal {
        Principal::Operator => (1, Vec::new()),
        Principal::Merchant(id) => (2, id16(id.to_u128())),
        Principal::Payer(id) => (3, id16(id.to_u128())),
    }
}

pub(crate) fn principal_of(kind: i16, id: &[u8]) -> Result<Principal, PgError> {
    Ok(match kind {
        1 => Principal::Operator,
        2 => Principal::Merchant(MerchantId::from_u128(u128_of(id)?)),
        3 => Principal::Payer(PayerId::from_u128(u128_of(id)?)),
        _ => return Err(stored("a principal kind")),
    })
}

/// `owner_kind`: 1 payer, 2 merchant, 3 platform fees, 4 external funding (empty id).
fn owner_columns(owner: Owner) -> (i16, Vec<u8>) {
    match owner {
        Owner::Payer(id) => (1, id16(id.to_u128())),
        Owner::Merchant(id) => (2, id16(id.to_u128())),
        Owner::PlatformFees => (3, Vec::new()),
        Owner::ExternalFunding => (4, Vec::new()),
    }
}

pub(crate) fn owner_of(kind: i16, id: &[u8]) -> Result<Owner, PgError> {
    Ok(match kind {
        1 => Owner::Payer(PayerId::from_u128(u128_of(id)?)),
        2 => Owner::Merchant(MerchantId::from_u128(u128_of(id)?)),
        3 => Owner::PlatformFees,
        4 => Owner::ExternalFunding,
        _ => return Err(stored("an owner kind")),
    })
}
