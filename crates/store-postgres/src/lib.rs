//! Farthing's PostgreSQL storage.
//!
//! This crate owns the schema: numbered, named migrations embedded in the binary and a runner
//! that applies them at start or through `farthing migrate`. It also has [`apply_batch`], the
//! write path of the shared store that lets several `farthing serve` processes use one
//! database (designed in `docs/adr/0002-postgresql-backend-shape.md`): a batch of records
//! applied in one transaction, over a working set loaded for it; and [`query`], its read side,
//! which answers what the handlers ask the in-memory state with SQL. The server does not call
//! them yet; `farthing bench --database-url` measures [`apply_batch`].
//!
//! The SQL stays portable to PostgreSQL-compatible distributed engines: no advisory locks
//! (migrators serialize on a row lock), no LISTEN/NOTIFY, no triggers or stored procedures, no
//! sequences for ids.
#![forbid(unsafe_code)]

use std::time::{SystemTime, UNIX_EPOCH};

use tokio_postgres::{Client, NoTls};

mod apply;
pub mod query;

pub use apply::{ATTEMPTS_MAX, Answer, apply_batch, apply_batch_answered};

/// One schema change, applied once, in order of `version`.
#[derive(Clone, Copy, Debug)]
pub struct Migration {
    pub version: i32,
    pub name: &'static str,
    pub sql: &'static str,
}

/// Every migration this build knows, oldest first. Until the PostgreSQL backend ships, the
/// first migration may still change; after that, migrations are only ever added.
pub const MIGRATIONS: &[Migration] = &[Migration {
    version: 1,
    name: "parties_ledger_payments",
    sql: include_str!("../migrations/0001_parties_ledger_payments.sql"),
}];

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
    #[error("migration {version} is recorded as {found:?} but this build calls it {expected:?}")]
    MismatchedMigration {
        version: i32,
        expected: &'static str,
        found: String,
    },
}

/// Connects without TLS (a database on the same host or a private network) and drives the
/// connection in the background.
pub async fn connect(url: &str) -> Result<Client, PgError> {
    let (client, connection) = tokio_postgres::connect(url, NoTls).await?;
    tokio::spawn(async move {
        if let Err(error) = connection.await {
            tracing::warn!(%error, "PostgreSQL connection closed");
        }
    });
    Ok(client)
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
