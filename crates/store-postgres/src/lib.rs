//! Farthing's PostgreSQL storage: the shared store that lets several `farthing serve`
//! processes use one database (designed in `docs/adr/0002-postgresql-backend-shape.md`).
//!
//! - The schema: numbered, named migrations embedded in the binary and [`migrate`], run when a
//!   server starts and by `farthing migrate`.
//! - [`apply_batch`], the write path: a batch of records applied in one transaction, over a
//!   working set loaded for it, with the same pure `State::apply` the embedded store runs.
//!   [`apply_batch_foreseen`] does the same with a [`Forecast`] of the accounts, so that one
//!   process's batches overlap instead of queueing for their accounts' locks.
//! - [`query`], the read side, with the same answers as the in-memory state.
//! - [`PgStore`], the `SharedStore` port over both, with a pool that reconnects by itself.
//! - [`export`] reads a whole database back as the items of `State::export`, for
//!   `farthing copy` and for comparing a database with an in-memory state.
//!
//! The SQL stays portable to PostgreSQL-compatible distributed engines (the rules are in
//! ARCHITECTURE.md, and `tests/portable_sql.rs` holds the code to them): no advisory locks
//! (migrators serialize on a row lock), no LISTEN/NOTIFY, no triggers or stored procedures, no
//! sequences for ids.
#![forbid(unsafe_code)]

use std::time::{SystemTime, UNIX_EPOCH};

use tokio_postgres::Client;

mod apply;
pub mod export;
mod kinds;
pub mod query;
mod rows;
mod shared;
pub mod tls;

use farthing_payments::{Command, Record};

pub use apply::{
    ATTEMPTS_MAX, Answer, Forecast, apply_batch, apply_batch_answered, apply_batch_foreseen,
};
pub use shared::{PgOptions, PgStore};

/// Whether a journal replayed into PostgreSQL in several [`apply_batch`] calls may end one
/// batch between `previous` and `next` and still list everything in the journal's order.
///
/// Lists order rows by `(created_at, batch_position, id)`, and `batch_position` counts from 0
/// in each batch: rows of one time split over two batches would fall back to id order. So a
/// batch ends only where the time changes (a server's writer gives each commit one time and
/// times never go back), or between two imports, which `farthing copy` cuts only where the
/// times of payments and of each payer's statement lines change.
pub fn batch_may_end_between(previous: &Record, next: &Record) -> bool {
    previous.now != next.now
        || (matches!(previous.command, Command::Import(_))
            && matches!(next.command, Command::Import(_)))
}

/// One schema change, applied once, in order of `version`.
#[derive(Clone, Copy, Debug)]
pub struct Migration {
    pub version: i32,
    pub name: &'static str,
    pub sql: &'static str,
}

/// Every migration this build knows, oldest first: each file of `migrations/`, listed by
/// `build.rs` (`NNNN_<name>.sql`, numbered from 1 without a gap). Until the PostgreSQL backend
/// ships, the first migration may still change; after that, migrations are only ever added.
pub const MIGRATIONS: &[Migration] = include!(concat!(env!("OUT_DIR"), "/migrations.rs"));

#[derive(Debug, thiserror::Error)]
pub enum PgError {
    #[error("PostgreSQL failed")]
    Postgres(#[from] tokio_postgres::Error),
    #[error(
        "the database has migration {version}, which this build does not know: it was set up by a newer Farthing"
    )]
    NewerSchema { version: i32 },
    /// A stored row this build cannot read, or a value the schema cannot hold.
    #[error("stored data does not fit: {0}")]
    Stored(String),
    /// The pool could not hand out a connection: a connect that timed out, or a pool built
    /// wrongly.
    #[error("no PostgreSQL connection: {0}")]
    Pool(String),
    #[error("migration {version} is recorded as {found:?} but this build calls it {expected:?}")]
    MismatchedMigration {
        version: i32,
        expected: &'static str,
        found: String,
    },
    /// The connection string asks for something that cannot be done (see [`tls`]).
    #[error("the PostgreSQL connection string: {0}")]
    Settings(String),
}

/// Connects, with TLS when the connection string's `sslmode` asks for it (see [`tls`]), and
/// drives the connection in the background.
pub async fn connect(url: &str) -> Result<Client, PgError> {
    let (client, driver) = connect_driven(url).await?;
    tokio::spawn(async move {
        if let Ok(Err(error)) = driver.await {
            tracing::warn!(%error, "PostgreSQL connection closed");
        }
    });
    Ok(client)
}

/// [`connect`], also giving the task that drives the connection, which ends once the client is
/// dropped and the connection closed (to wait for that).
pub async fn connect_driven(
    url: &str,
) -> Result<
    (
        Client,
        tokio::task::JoinHandle<Result<(), tokio_postgres::Error>>,
    ),
    PgError,
> {
    let target = tls::target(url)?;
    let (client, connection) = target.config.connect(target.tls).await?;
    Ok((client, tokio::spawn(connection)))
}

/// `url` naming database `name` instead (for tools and tests that make databases next to the
/// one they were given): a URL's path is replaced, and a `key=value` string gets a `dbname` at
/// the end (the last one counts).
pub fn with_database(url: &str, name: &str) -> String {
    let Some(scheme_end) = url.find("://") else {
        return format!("{url} dbname={name}");
    };
    let (base, query) = match url.split_once('?') {
        Some((base, query)) => (base, Some(query)),
        None => (url, None),
    };
    let authority_start = scheme_end + 3;
    let server = match base[authority_start..].find('/') {
        Some(slash) => &base[..authority_start + slash],
        None => base,
    };
    match query {
        Some(query) => format!("{server}/{name}?{query}"),
        None => format!("{server}/{name}"),
    }
}

/// What [`migrate`] did.
#[derive(Debug, PartialEq, Eq)]
pub struct Migrated {
    /// Versions applied by this call, in order.
    pub applied: Vec<i32>,
    /// The schema version now.
    pub version: i32,
}

/// Brings the schema up to date. Safe to run from several processes at once: they queue on a
/// row lock, and each migration is applied in one transaction, exactly once.
pub async fn migrate(client: &mut Client) -> Result<Migrated, PgError> {
    // Two processes creating the bookkeeping tables at once can collide in the catalog
    // (unique_violation, duplicate_table, or duplicate_object for the table's row type): the
    // loser retries, and then finds them made.
    for attempt in 0..3 {
        match client
            .batch_execute(
                "CREATE TABLE IF NOT EXISTS farthing_migrations (
                     version INTEGER PRIMARY KEY,
                     name TEXT NOT NULL,
                     applied_at BIGINT NOT NULL
                 );
                 CREATE TABLE IF NOT EXISTS farthing_migration_lock (id INTEGER PRIMARY KEY);
                 INSERT INTO farthing_migration_lock (id) VALUES (1) ON CONFLICT DO NOTHING;",
            )
            .await
        {
            Ok(()) => break,
            Err(error) if attempt < 2 && is_catalog_race(&error) => continue,
            Err(error) => return Err(error.into()),
        }
    }
    let transaction = client.transaction().await?;
    transaction
        .query_one(
            "SELECT id FROM farthing_migration_lock WHERE id = 1 FOR UPDATE",
            &[],
        )
        .await?;
    let recorded = transaction
        .query(
            "SELECT version, name FROM farthing_migrations ORDER BY version",
            &[],
        )
        .await?;
    let mut version = 0;
    for row in &recorded {
        let (recorded_version, name): (i32, String) = (row.get(0), row.get(1));
        let Some(known) = MIGRATIONS.iter().find(|m| m.version == recorded_version) else {
            return Err(PgError::NewerSchema {
                version: recorded_version,
            });
        };
        if known.name != name {
            return Err(PgError::MismatchedMigration {
                version: recorded_version,
                expected: known.name,
                found: name,
            });
        }
        version = version.max(recorded_version);
    }
    let mut applied = Vec::new();
    let recorded_version = version;
    for migration in MIGRATIONS.iter().filter(|m| m.version > recorded_version) {
        transaction.batch_execute(migration.sql).await?;
        transaction
            .execute(
                "INSERT INTO farthing_migrations (version, name, applied_at) VALUES ($1, $2, $3)",
                &[&migration.version, &migration.name, &unix_seconds()],
            )
            .await?;
        tracing::info!(
            version = migration.version,
            name = migration.name,
            "applied migration"
        );
        applied.push(migration.version);
        version = migration.version;
    }
    transaction.commit().await?;
    Ok(Migrated { applied, version })
}

/// The schema version of the database: the latest migration recorded, 0 when none is (a
/// database Farthing never set up).
pub async fn schema_version(client: &Client) -> Result<i32, PgError> {
    let row = client
        .query_one("SELECT to_regclass('farthing_migrations') IS NOT NULL", &[])
        .await?;
    if !row.get::<_, bool>(0) {
        return Ok(0);
    }
    let row = client
        .query_one(
            "SELECT coalesce(max(version), 0) FROM farthing_migrations",
            &[],
        )
        .await?;
    Ok(row.get(0))
}

/// Whether the database holds any of Farthing's data: a key, a party, an account, a transfer,
/// a payment or an idempotency key. The schema must be up to date.
pub async fn holds_data(client: &Client) -> Result<bool, PgError> {
    let row = client
        .query_one(
            "SELECT EXISTS (SELECT 1 FROM operator_keys)
                 OR EXISTS (SELECT 1 FROM merchants)
                 OR EXISTS (SELECT 1 FROM payers)
                 OR EXISTS (SELECT 1 FROM accounts)
                 OR EXISTS (SELECT 1 FROM transfers)
                 OR EXISTS (SELECT 1 FROM payments)
                 OR EXISTS (SELECT 1 FROM idempotency_keys)",
            &[],
        )
        .await?;
    Ok(row.get(0))
}

fn is_catalog_race(error: &tokio_postgres::Error) -> bool {
    use tokio_postgres::error::SqlState;
    matches!(
        error.code(),
        Some(code) if *code == SqlState::UNIQUE_VIOLATION
            || *code == SqlState::DUPLICATE_TABLE
            || *code == SqlState::DUPLICATE_OBJECT
    )
}

fn unix_seconds() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}
