//! Applying a batch of records in one PostgreSQL transaction (ADR 0002): load what the batch
//! reads into a working set, run the same `State::apply` the embedded store runs, and write
//! back what changed, set-based.
//!
//! Stored forms: object ids are 16 bytes big-endian; times are BIGINT microseconds; account ids
//! are the derived 64-bit id bit-cast to BIGINT; currencies are their three letters. New
//! payments and statement lines also get their `batch_position`, which orders lists between
//! rows of one time (see `query`); a payment's own statement line is kept in its row (see
//! `lines`).
//!
//! Round trips: the statements of one loading round, and all the statements that persist a
//! batch, are sent together (tokio-postgres pipelines requests issued concurrently on one
//! connection), each with its parameter types given, so none waits for a prepare. Large sets
//! of new payments, statement lines and transfers go in with binary `COPY`, smaller ones with
//! `INSERT … SELECT FROM unnest(…)`.

use std::collections::{BTreeSet, HashMap};
use std::sync::atomic::Ordering::Relaxed;
use std::time::{Duration, Instant};

use bytes::{BufMut, Bytes, BytesMut};
use farthing_ledger::{
    Account, Currency, HoldState, Timestamp, TransferId, TransferKind, TransferRecord,
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
    apply_with(client, records, None).await
}

/// [`apply_batch_answered`], working the batch out from `forecast` when it knows every account
/// the batch reads (see [`Forecast`]). The outcomes are the same either way; what differs is
/// how long the batch holds its accounts' locks. Batches on other connections that share the
/// forecast may run at the same time.
pub async fn apply_batch_foreseen(
    client: &mut Client,
    records: &[Record],
    forecast: &Forecast,
) -> Result<Vec<Answer>, PgError> {
    apply_with(client, records, Some(forecast)).await
}

async fn apply_with(
    client: &mut Client,
    records: &[Record],
    forecast: Option<&Forecast>,
) -> Result<Vec<Answer>, PgError> {
    let mut attempt = 1;
    let mut assume_new_ids_free = true;
    // Whether to work the batch out from the forecast (not while it cools down). A batch
    // that settles a hold reads the hold's record and its accounts' pending totals together,
    // and only locked accounts are sure to agree with a record read now: it locks first.
    let settles_holds = records.iter().any(|record| match &record.command {
        Command::Room(command) => command.settles_pending(),
        _ => false,
    });
    let mut foresee = forecast.is_some_and(Forecast::usable) && !settles_holds;
    loop {
        match apply_once(client, records, assume_new_ids_free, forecast, foresee).await {
            Ok(Attempt::Applied(answers)) => return Ok(answers),
            Ok(Attempt::NewIdTaken) => {
                tracing::debug!("an id the batch makes is taken, applying again with it loaded");
                assume_new_ids_free = false;
            }
            Ok(Attempt::Mispredicted) => {
                if let Some(forecast) = forecast {
                    forecast.counts.wrong.fetch_add(1, Relaxed);
                }
                foresee = false;
            }
            Err(PgError::Postgres(error)) if attempt < ATTEMPTS_MAX && is_retryable(&error) => {
                tracing::debug!(%error, attempt, "batch conflicted, retrying");
                if let Some(forecast) = forecast {
                    forecast.counts.conflicts.fetch_add(1, Relaxed);
                }
                tokio::time::sleep(backoff(attempt)).await;
                attempt += 1;
                // A unique violation may be an id assumed free: load them all from now on.
                assume_new_ids_free = false;
                foresee = false;
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
    /// The batch was worked out from the forecast, and its accounts held something else;
    /// nothing was committed.
    Mispredicted,
}

async fn apply_once(
    client: &mut Client,
    records: &[Record],
    assume_new_ids_free: bool,
    forecast: Option<&Forecast>,
    foresee: bool,
) -> Result<Attempt, PgError> {
    let started = Instant::now();
    let transaction = client.transaction().await?;
    let (mut working, assumed, wanted) =
        load_working_set(&transaction, records, assume_new_ids_free, forecast).await?;
    // The accounts: from the forecast (checked under lock before the commit), which first
    // learns those it does not know as they stand committed; else locked and read now.
    let foreseen = match forecast.filter(|_| foresee) {
        Some(forecast) => {
            let unknown = forecast.unknown(&wanted);
            if !unknown.is_empty() {
                let committed = read_accounts(&transaction, &unknown).await?;
                forecast.learn_unknown(figures_of(&committed));
            }
            forecast.work_out(&wanted, |before| {
                for (&(owner, _), known) in before {
                    loaded("an account", working.insert_account(owner, known.account))?;
                }
                let last_changed = before.values().map(|known| known.changed_at).max();
                let run = run_batch(&mut working, records, last_changed);
                let after = figures_after(&working, &wanted, before, &run.changes, run.now);
                Ok::<_, PgError>((run, after))
            })?
        }
        None => None,
    };
    // From here until the commit, the figures this batch gave the forecast are in doubt: if
    // the batch stops for any reason (an error, a wrong forecast, a timeout that drops this
    // future), they are forgotten.
    let mut doubt = Doubt {
        forecast,
        wanted: &wanted,
        ticket: None,
    };
    let (run, before) = match foreseen {
        Some((run, before, ticket)) => {
            doubt.ticket = Some(ticket);
            (run, Some(before))
        }
        None => {
            if let Some(forecast) = forecast {
                // After the batches worked out before: they hold, or will hold, the locks
                // first, as they assumed.
                forecast.wait_queue().await;
            }
            let locked = load_accounts(&transaction, &wanted).await?;
            let mut last_changed = None;
            for &(owner, account, changed_at) in &locked {
                last_changed = last_changed.max(Some(changed_at));
                loaded("an account", working.insert_account(owner, account))?;
            }
            let run = run_batch(&mut working, records, last_changed);
            if let Some(forecast) = forecast {
                // What this batch leaves, for the batches after it (it holds the locks).
                let before = figures_of(&locked);
                forecast.learn(figures_after(
                    &working,
                    &wanted,
                    &before,
                    &run.changes,
                    run.now,
                ));
            }
            (run, None)
        }
    };
    let loaded = Instant::now();
    let applied = run.later.as_deref().unwrap_or(records);
    let (payments, transfers) = assumed.unwritten(&working, applied, &run.executed, &run.changes);
    let made_from = if run.changes.payments.is_empty() {
        None
    } else {
        payment_lines_from(&transaction, forecast).await?
    };
    let lines = Lines::plan(&run.changes, made_from)?;
    let written = persist(
        &transaction,
        &run.changes,
        &lines,
        run.now,
        (&payments, &transfers),
        before.is_none(),
    )
    .await?;
    if written == Persisted::NewIdTaken {
        // Dropping the transaction rolls it back.
        return Ok(Attempt::NewIdTaken);
    }
    let persisted = Instant::now();
    // Worked out from the forecast: once the batches worked out before it hold their
    // accounts, take this one's, and go on only if they held what it assumed.
    if let (Some(before), Some(forecast), Some(ticket)) = (&before, forecast, doubt.ticket) {
        forecast.wait_turn(ticket).await;
        let held = take_foreseen_accounts(&transaction, before, &run.changes, run.now).await?;
        forecast.pass_turn(ticket);
        if !held {
            tracing::debug!("the forecast was wrong, applying again from locked accounts");
            return Ok(Attempt::Mispredicted);
        }
    }
    let checked = Instant::now();
    transaction.commit().await?;
    doubt.forecast = None;
    if let Some(forecast) = forecast {
        if before.is_some() {
            forecast.confirmed();
            forecast.counts.foreseen.fetch_add(1, Relaxed);
        } else {
            forecast.counts.locked_first.fetch_add(1, Relaxed);
        }
    }
    let millis = |from: Instant, to: Instant| (to - from).as_secs_f64() * 1_000.0;
    tracing::debug!(
        records = records.len(),
        foreseen = before.is_some(),
        load_ms = millis(started, loaded),
        persist_ms = millis(loaded, persisted),
        lock_ms = millis(persisted, checked),
        commit_ms = millis(checked, Instant::now()),
        "batch applied"
    );
    Ok(Attempt::Applied(run.answers))
}

/// A batch's records run on its working set.
struct Run {
    /// The records with a later time, when they needed one.
    later: Option<Vec<Record>>,
    answers: Vec<Answer>,
    /// Whether each record's command ran: a replayed or reused idempotency key answers
    /// without reading anything else.
    executed: Vec<bool>,
    changes: Changes,
    /// The batch's time: the latest of its records'.
    now: Timestamp,
}

/// Runs `records` on `working`, which holds everything they read. Batches commit in the order
/// their accounts' locks are granted, which need not be the order of their times (another
/// server's clock, or a batch that took its time first and then waited for these locks). A
/// batch is given a time later than any earlier change to the accounts it holds
/// (`last_changed`), so that lists ordered by time, and a statement's running balance, follow
/// the order of commits.
fn run_batch(working: &mut State, records: &[Record], last_changed: Option<Timestamp>) -> Run {
    let later: Option<Vec<Record>> = match last_changed {
        Some(last) if records.iter().any(|record| record.now <= last) => Some(
            records
                .iter()
                .map(|record| Record {
                    now: record.now.max(Timestamp(last.0.saturating_add(1))),
                    ..record.clone()
                })
                .collect(),
        ),
        _ => None,
    };
    let records = later.as_deref().unwrap_or(records);
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
    let now = records.iter().map(|r| r.now).max().unwrap_or(Timestamp(0));
    Run {
        later,
        answers,
        executed,
        changes,
        now,
    }
}

/// Forgets what a batch gave the forecast, unless it committed, and passes its turn to lock.
struct Doubt<'a> {
    forecast: Option<&'a Forecast>,
    wanted: &'a BTreeSet<(Owner, Currency)>,
    ticket: Option<u64>,
}

impl Drop for Doubt<'_> {
    fn drop(&mut self) {
        if let Some(forecast) = self.forecast {
            forecast.forget(self.wanted);
            if let Some(ticket) = self.ticket {
                forecast.pass_turn(ticket);
            }
        }
    }
}

mod columns;
mod forecast;
mod lines;
mod load;
mod persist;

pub(crate) use columns::*;
pub use forecast::Forecast;
use forecast::*;
use lines::*;
use load::*;
use persist::*;
