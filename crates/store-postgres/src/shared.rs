//! [`PgStore`]: the shared store over PostgreSQL, which several `farthing serve` processes use
//! at once. Writes go through [`apply_batch_foreseen`] (one transaction per batch, with one
//! [`Forecast`] for the process); reads through [`crate::query`].
//!
//! **Outages.** Every call takes a connection from a `deadpool-postgres` pool, which makes one
//! when none is idle, with a short connect timeout, so a database that is down answers
//! [`StoreError::Unavailable`] at once instead of queueing requests behind it. A connection
//! that failed in any way is taken out of the pool rather than returned to it, and one found
//! closed is replaced; when the database is back, the next call connects again. Nothing needs
//! restarting. A call that outlives
//! [`PgOptions::call_timeout`] is abandoned and its connection dropped, which rolls back
//! whatever it had not committed.
//!
//! A batch whose COMMIT was sent but whose answer was lost with the connection may have been
//! applied: its requests are answered 503, and a retry with the same idempotency key gets the
//! stored answer. Nothing is acknowledged that was not committed.

use std::time::Duration;

use deadpool_postgres::{
    Manager, ManagerConfig, Object, Pool, QueueMode, RecyclingMethod, Runtime,
};
use farthing_ledger::{Currency, Timestamp};
use farthing_payments::{
    EntryObject, IdempotencyKey, KeyHash, MerchantId, Page, PayerId, Payment, PaymentId, Principal,
    Record,
};
use farthing_store::{
    Answer, IdempotencyFound, Reads, SharedStore, StatementPage, StoreCounter, StoreError,
    StoreFuture,
};
use tokio::sync::{Semaphore, SemaphorePermit};
use tokio_postgres::Client;
use tokio_postgres::error::SqlState;

use crate::{Forecast, PgError, apply_batch_foreseen, migrate, query};

/// How a [`PgStore`] connects.
#[derive(Clone, Debug)]
pub struct PgOptions {
    /// Connections open at once at most (writers and readers together).
    pub connections_max: usize,
    /// Of those, how many are kept for batches: reads never hold more than the rest, so a
    /// flood of reads cannot hold up the writers.
    pub writer_connections: usize,
    /// How long making a connection may take.
    pub connect_timeout: Duration,
    /// How long one call (a batch, a read) may take, waiting for a connection included.
    pub call_timeout: Duration,
}

impl Default for PgOptions {
    fn default() -> Self {
        PgOptions {
            connections_max: 16,
            writer_connections: 2,
            connect_timeout: Duration::from_secs(2),
            call_timeout: Duration::from_secs(10),
        }
    }
}

/// The shared store over one PostgreSQL database.
pub struct PgStore {
    /// The connections, made with the session limits below.
    pool: Pool,
    options: PgOptions,
    /// Taken by reads before a connection, so that some connections are always left for
    /// batches: the pool itself does not set any aside.
    read_permits: Semaphore,
    /// This process's forecast of its accounts, shared by its writers.
    forecast: Forecast,
}

/// A connection taken from the pool; it goes back when dropped, unless it failed.
struct Pooled<'a> {
    client: Option<Object>,
    _read_permit: Option<SemaphorePermit<'a>>,
}

impl Pooled<'_> {
    fn client(&mut self) -> &mut Client {
        self.client.as_mut().expect("held until dropped")
    }

    /// Takes the connection out of the pool instead of returning it: after a failure its
    /// state is unknown.
    fn discard(&mut self) {
        if let Some(object) = self.client.take() {
            drop(Object::take(object));
        }
    }
}

impl PgStore {
    /// Parses `url`, connects once (so that a wrong URL or a missing database is reported at
    /// start), and brings the schema up to date.
    ///
    /// The pool's sessions have PostgreSQL end any statement, and any transaction left idle,
    /// after the call timeout: a server that freezes mid-batch (stopped, or cut off from the
    /// database) releases its row locks then, instead of when TCP gives up on it, and other
    /// servers' batches on those accounts go on. (Migrations run on a session of their own,
    /// without these limits.)
    pub async fn open(url: &str, options: PgOptions) -> Result<PgStore, PgError> {
        let crate::tls::Target { mut config, tls } = crate::tls::target(url)?;
        config.connect_timeout(options.connect_timeout);
        config.keepalives(true);
        config.keepalives_idle(Duration::from_secs(30));
        config.application_name("farthing");
        let (mut migrator, connection) = config.connect(tls.clone()).await?;
        let driver = tokio::spawn(connection);
        migrate(&mut migrator).await?;
        drop(migrator);
        let _ = driver.await;
        let limit = options.call_timeout.as_millis().max(1);
        let mut session = config;
        session.options(format!(
            "-c statement_timeout={limit} -c idle_in_transaction_session_timeout={limit}"
        ));
        let connections = options.connections_max.max(1);
        let manager = Manager::from_config(
            session,
            tls,
            ManagerConfig {
                // A connection coming back is checked for being closed, without a round trip:
                // one that failed mid-call never comes back (see `Pooled::discard`).
                recycling_method: RecyclingMethod::Fast,
            },
        );
        let pool = Pool::builder(manager)
            .max_size(connections)
            // The connection used last goes out first: under light load the same few
            // connections (and PostgreSQL backends, with their caches warm) do all the work.
            .queue_mode(QueueMode::Lifo)
            .runtime(Runtime::Tokio1)
            .create_timeout(Some(options.connect_timeout))
            .build()
            .map_err(|error| PgError::Pool(error.to_string()))?;
        let store = PgStore {
            pool,
            read_permits: Semaphore::new(
                connections
                    .saturating_sub(options.writer_connections)
                    .max(1),
            ),
            options,
            forecast: Forecast::default(),
        };
        // One connection now, so that a URL that cannot serve is reported at start.
        drop(store.take(false).await?);
        Ok(store)
    }

    async fn take(&self, read: bool) -> Result<Pooled<'_>, PgError> {
        let read_permit = if read {
            Some(
                self.read_permits
                    .acquire()
                    .await
                    .expect("the read semaphore is never closed"),
            )
        } else {
            None
        };
        let client = self.pool.get().await.map_err(|error| match error {
            deadpool_postgres::PoolError::Backend(error) => PgError::Postgres(error),
            other => PgError::Pool(other.to_string()),
        })?;
        Ok(Pooled {
            client: Some(client),
            _read_permit: read_permit,
        })
    }

    /// Runs `work` within the call timeout.
    async fn timed<T>(
        &self,
        work: impl std::future::Future<Output = Result<T, StoreError>>,
    ) -> Result<T, StoreError> {
        match tokio::time::timeout(self.options.call_timeout, work).await {
            Ok(result) => result,
            Err(_) => Err(StoreError::Unavailable(format!(
                "no answer from PostgreSQL within {:?}",
                self.options.call_timeout
            ))),
        }
    }

    /// A connection for a read.
    async fn pooled(&self) -> Result<Pooled<'_>, StoreError> {
        self.take(true).await.map_err(sort)
    }

    /// A connection for a batch, from all of them.
    async fn pooled_for_batch(&self) -> Result<Pooled<'_>, StoreError> {
        self.take(false).await.map_err(sort)
    }
}

impl Pooled<'_> {
    /// Sorts a call's failure, dropping the connection it failed on.
    fn finish<T>(&mut self, result: Result<T, PgError>) -> Result<T, StoreError> {
        if result.is_err() {
            self.discard();
        }
        result.map_err(sort)
    }
}

/// Whether a failure means the database cannot be reached (retry later; the pool reconnects)
/// or that it refused or returned something unreadable.
fn sort(error: PgError) -> StoreError {
    match &error {
        PgError::Pool(_) => StoreError::Unavailable(describe(&error)),
        PgError::Postgres(inner) if is_unavailable(inner) => {
            StoreError::Unavailable(describe(&error))
        }
        _ => StoreError::Database(describe(&error)),
    }
}

fn is_unavailable(error: &tokio_postgres::Error) -> bool {
    if error.is_closed() {
        return true;
    }
    match error.code() {
        // No SQLSTATE: the socket failed, or a connect timed out.
        None => true,
        Some(code) => {
            code.code().starts_with("08")
                || *code == SqlState::ADMIN_SHUTDOWN
                || *code == SqlState::CRASH_SHUTDOWN
                || *code == SqlState::CANNOT_CONNECT_NOW
                || *code == SqlState::TOO_MANY_CONNECTIONS
                || *code == SqlState::READ_ONLY_SQL_TRANSACTION
                // The session's own limits (see `PgStore::open`): the call took too long, as
                // when the client's call timeout fires first.
                || *code == SqlState::QUERY_CANCELED
                || *code == SqlState::IDLE_IN_TRANSACTION_SESSION_TIMEOUT
        }
    }
}

/// The error with its causes, which is where PostgreSQL says what went wrong.
fn describe(error: &PgError) -> String {
    let mut text = error.to_string();
    let mut source = std::error::Error::source(error);
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

impl farthing_store::TestClockStore for PgStore {
    fn test_clock_offset(&self) -> StoreFuture<'_, u64> {
        Box::pin(self.timed(async move {
            let mut pooled = self.pooled().await?;
            let result = pooled
                .client()
                .query_opt("SELECT offset_micros FROM test_clock", &[])
                .await
                .map_err(PgError::from)
                .and_then(|row| match row {
                    None => Ok(0),
                    Some(row) => offset_from(row.try_get(0)?),
                });
            pooled.finish(result)
        }))
    }

    fn advance_test_clock(&self, by_micros: u64) -> StoreFuture<'_, u64> {
        Box::pin(self.timed(async move {
            let by = i64::try_from(by_micros).unwrap_or(i64::MAX);
            let mut pooled = self.pooled().await?;
            // One statement: servers advancing at once each add their step.
            let result = pooled
                .client()
                .query_one(
                    "INSERT INTO test_clock (id, offset_micros) VALUES (TRUE, $1)
                     ON CONFLICT (id) DO UPDATE
                         SET offset_micros = test_clock.offset_micros + EXCLUDED.offset_micros
                     RETURNING offset_micros",
                    &[&by],
                )
                .await
                .map_err(PgError::from)
                .and_then(|row| offset_from(row.try_get(0)?));
            pooled.finish(result)
        }))
    }
}

/// A stored lead over the wall clock, which the schema keeps at zero or more.
fn offset_from(stored: i64) -> Result<u64, PgError> {
    u64::try_from(stored).map_err(|_| PgError::Stored("a negative lead of the test clock".into()))
}

impl SharedStore for PgStore {
    fn counters(&self) -> Vec<StoreCounter> {
        use std::sync::atomic::Ordering::Relaxed;
        let counts = &self.forecast.counts;
        let batches = "Batches committed, by how their accounts were read: worked out from the \
                       process's forecast and checked under lock, or locked and read first.";
        vec![
            StoreCounter {
                name: "farthing_pg_batches_total",
                help: batches,
                label: Some(("path", "foreseen")),
                value: counts.foreseen.load(Relaxed),
            },
            StoreCounter {
                name: "farthing_pg_batches_total",
                help: batches,
                label: Some(("path", "locked_first")),
                value: counts.locked_first.load(Relaxed),
            },
            StoreCounter {
                name: "farthing_pg_forecast_wrong_total",
                help: "Batches whose forecast another process (or a failed batch) had made \
                       wrong, applied again from locked accounts.",
                label: None,
                value: counts.wrong.load(Relaxed),
            },
            StoreCounter {
                name: "farthing_pg_batch_conflicts_total",
                help: "Batch attempts redone after a serialization failure, a deadlock or a \
                       unique violation.",
                label: None,
                value: counts.conflicts.load(Relaxed),
            },
        ]
    }

    fn apply<'a>(&'a self, records: &'a [Record]) -> StoreFuture<'a, Vec<Answer>> {
        Box::pin(self.timed(async move {
            let mut pooled = self.pooled_for_batch().await?;
            let result = apply_batch_foreseen(pooled.client(), records, &self.forecast).await;
            Ok(pooled
                .finish(result)?
                .into_iter()
                .map(|answer| Answer {
                    outcome: answer.outcome,
                    replayed: answer.replayed,
                })
                .collect())
        }))
    }

    fn idempotency<'a>(
        &'a self,
        key: &'a IdempotencyKey,
    ) -> StoreFuture<'a, Option<IdempotencyFound>> {
        Box::pin(self.timed(async move {
            let mut pooled = self.pooled().await?;
            let result = query::idempotency(pooled.client(), key).await;
            Ok(pooled
                .finish(result)?
                .map(|(fingerprint, outcome)| IdempotencyFound {
                    fingerprint,
                    outcome,
                }))
        }))
    }
}

impl Reads for PgStore {
    fn principal<'a>(&'a self, key_hash: &'a KeyHash) -> StoreFuture<'a, Option<Principal>> {
        Box::pin(self.timed(async move {
            let mut pooled = self.pooled().await?;
            let result = query::principal(pooled.client(), key_hash).await;
            pooled.finish(result)
        }))
    }

    fn has_operator_key(&self) -> StoreFuture<'_, bool> {
        Box::pin(self.timed(async move {
            let mut pooled = self.pooled().await?;
            let result = pooled
                .client()
                .query_one("SELECT EXISTS (SELECT 1 FROM operator_keys)", &[])
                .await
                .map(|row| row.get(0))
                .map_err(PgError::from);
            pooled.finish(result)
        }))
    }

    fn payer_balances(&self, id: PayerId) -> StoreFuture<'_, Option<Vec<(Currency, i128)>>> {
        Box::pin(self.timed(async move {
            let mut pooled = self.pooled().await?;
            let result = query::payer_balances(pooled.client(), id).await;
            pooled.finish(result)
        }))
    }

    fn merchant_balances(&self, id: MerchantId) -> StoreFuture<'_, Option<Vec<(Currency, i128)>>> {
        Box::pin(self.timed(async move {
            let mut pooled = self.pooled().await?;
            let result = query::merchant_balances(pooled.client(), id).await;
            pooled.finish(result)
        }))
    }

    fn payment(&self, id: PaymentId) -> StoreFuture<'_, Option<Payment>> {
        Box::pin(self.timed(async move {
            let mut pooled = self.pooled().await?;
            let result = query::payment(pooled.client(), id).await;
            pooled.finish(result)
        }))
    }

    fn row(&self, tag: u8, id: u128) -> StoreFuture<'_, Option<farthing_payments::StoredRow>> {
        Box::pin(self.timed(async move {
            let mut pooled = self.pooled().await?;
            let result = query::row(pooled.client(), tag, id).await;
            pooled.finish(result)
        }))
    }

    fn next_hold_deadline(&self) -> StoreFuture<'_, Option<Timestamp>> {
        Box::pin(self.timed(async move {
            let mut pooled = self.pooled().await?;
            let result = query::next_hold_deadline(pooled.client()).await;
            pooled.finish(result)
        }))
    }

    fn list_payments(
        &self,
        principal: Principal,
        limit: usize,
        starting_after: Option<PaymentId>,
    ) -> StoreFuture<'_, Option<Page<Payment>>> {
        Box::pin(self.timed(async move {
            let mut pooled = self.pooled().await?;
            let result = async {
                // One snapshot: the cursor is resolved and the page read as of one moment.
                let transaction = snapshot(pooled.client()).await?;
                let page =
                    query::list_payments(&transaction, principal, limit, starting_after).await?;
                transaction.commit().await?;
                Ok(page)
            }
            .await;
            pooled.finish(result)
        }))
    }

    fn payer_entries(
        &self,
        payer: PayerId,
        limit: usize,
        starting_after: Option<EntryObject>,
    ) -> StoreFuture<'_, StatementPage> {
        Box::pin(self.timed(async move {
            let mut pooled = self.pooled().await?;
            let result = async {
                let transaction = snapshot(pooled.client()).await?;
                let page =
                    match query::payer_entries(&transaction, payer, limit, starting_after).await? {
                        Some(page) => StatementPage::Page(page),
                        None if query::payer_balances(&transaction, payer).await?.is_none() => {
                            StatementPage::UnknownPayer
                        }
                        None => StatementPage::UnknownCursor,
                    };
                transaction.commit().await?;
                Ok(page)
            }
            .await;
            pooled.finish(result)
        }))
    }
}

/// A read-only transaction over one snapshot.
async fn snapshot(client: &mut Client) -> Result<tokio_postgres::Transaction<'_>, PgError> {
    Ok(client
        .build_transaction()
        .isolation_level(tokio_postgres::IsolationLevel::RepeatableRead)
        .read_only(true)
        .start()
        .await?)
}
