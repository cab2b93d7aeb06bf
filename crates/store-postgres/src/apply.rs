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
    Account, Amount, Currency, HoldState, Timestamp, TransferId, TransferKind, TransferRecord,
    TransferRejection,
};
use farthing_payments::codec::encode_outcome;
use farthing_payments::{
    Changes, Command, Entry, EntryObject, FundingSource, IdempotencyKey, IdempotencyLookup,
    IdempotencyRow, KeyHash, LoadError, Merchant, MerchantId, Outcome, Owner, Payer, PayerId,
    Payment, PaymentId, Principal, Record, Refund, RefundId, State, Topup, TopupId, account_id,
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

mod columns;
mod load;
mod persist;

pub(crate) use columns::*;
use load::*;
use persist::*;
