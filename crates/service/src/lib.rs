//! Farthing's use cases over the pure state and a storage port.
//!
//! With the embedded store, one writer thread owns every change. Requests from any number of
//! connections queue up; the writer takes all that are waiting (up to
//! [`RECORDS_PER_COMMIT_MAX`]), appends them to the journal with one `fdatasync`, then applies
//! them to the in-memory [`State`] in order and answers each. That is group commit: under load,
//! one fsync acknowledges thousands of payments. Because records are applied only once
//! durable, reads (a shared lock on the state) never see a payment that a crash could take
//! back, and a write the journal refuses changes nothing.
//!
//! With a shared store (PostgreSQL, several processes on one database), writer tasks take the
//! waiting requests the same way and hand each batch to the store, which applies it in one
//! transaction; reads ask the store. A store that cannot be reached answers
//! [`ServiceError::StorageUnavailable`] at once, and the next request tries it again.
#![forbid(unsafe_code)]

mod env;
mod local_reads;
mod refusals;
mod secret;
mod test_clock;

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock, RwLockReadGuard};
use std::thread::JoinHandle;
use std::time::Instant;

use farthing_ledger::{Amount, Currency, Timestamp, TransferId};
use farthing_payments::*;
use farthing_store::{Checkpoints, Journal, Reads, SharedStore, StatementPage, StoreError};
use tokio::sync::{mpsc, oneshot};

pub use env::{Clock, Ids, ManualClock, SequentialIds, SystemClock, TimeOrderedIds};
pub use secret::{Secret, fingerprint, hex};
pub use test_clock::{TEST_CLOCK_ADVANCE_SECS_MAX, TEST_CLOCK_LEAD_SECS_MAX, TestClock};

/// Records in one durable commit at most.
pub const RECORDS_PER_COMMIT_MAX: usize = 8_190;
/// Payments in one batch request at most.
pub const PAYMENTS_PER_BATCH_MAX: usize = 8_190;
/// Requests waiting for the writer at most; senders wait beyond that.
pub const QUEUE_DEPTH_MAX: usize = 65_536;
/// How long idempotency keys are kept at least.
pub const IDEMPOTENCY_TTL_SECS: u64 = 24 * 60 * 60;

#[derive(Debug, thiserror::Error)]
pub enum ServiceError {
    #[error("the service is shutting down")]
    ShuttingDown,
    /// The journal refused a write (a full disk, say): nothing was changed; retry later.
    #[error("storage refused the write")]
    StorageUnavailable,
    #[error(transparent)]
    Store(#[from] StoreError),
    /// A shared store without an operator key, and none given: servers sharing a database
    /// must share its operator key, so none is made up by one of them.
    #[error(
        "the database has no operator key yet: set FARTHING_ADMIN_KEY (32+ characters), the same on every server that shares the database"
    )]
    OperatorKeyRequired,
    /// The operator key given is another party's API key: it would name two parties at once,
    /// so it is refused rather than ignored.
    #[error(
        "FARTHING_ADMIN_KEY is the API key of a {0}; the operator key must be a key of its own"
    )]
    OperatorKeyTaken(&'static str),
}

/// Settings the operator chooses.
#[derive(Clone, Debug)]
pub struct Config {
    /// The fee for merchants created without one.
    pub default_fee: FeeSchedule,
    /// The largest amount one request may move.
    pub amount_max: Amount,
    /// Currencies that may be used.
    pub currencies: Vec<Currency>,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            default_fee: FeeSchedule::ZERO,
            amount_max: Amount::from_micros(10_000 * farthing_ledger::MICROS_PER_UNIT),
            currencies: [
                "USD", "EUR", "GBP", "KES", "NGN", "INR", "JPY", "BRL", "ZAR",
            ]
            .iter()
            .map(|code| Currency::parse(code).expect("known codes"))
            .collect(),
        }
    }
}

/// The answer to a command, and whether it was a replay of an earlier request.
#[derive(Debug)]
pub struct Executed {
    pub outcome: Outcome,
    pub replayed: bool,
    /// For a created merchant or payer: its API key, shown once.
    pub api_key: Option<Secret>,
}

/// What the writer's queue carries.
// `Stop` is sent once per process; boxing every job instead would cost an allocation per request.
#[allow(clippy::large_enum_variant)]
enum Message {
    Job(Job),
    /// Commit what is queued, then stop.
    Stop,
    /// A checkpoint is on disk: its position waits in the checkpointer's own channel. (A
    /// wake-up only: a writer held back by a checkpoint waits on that channel, not on this.)
    CheckpointWritten,
}

/// The embedded store's bounded memory (ADR 0004): a disk behind the journal, written by
/// checkpoints, and how much memory the state may keep.
pub struct CacheOptions {
    pub checkpoints: Arc<dyn Checkpoints>,
    /// About how many bytes of rows the state keeps in memory beyond what changed since the
    /// last checkpoint; above it, a written checkpoint lets unchanged rows go.
    pub cache_bytes: usize,
    /// History rows (payments, top-ups, refunds, transfer records) made between two
    /// checkpoints.
    pub checkpoint_rows: usize,
    /// Called after the state lets unchanged rows go, off the lock: asks the process's
    /// allocator to give the freed memory back to the operating system. An allocator that
    /// keeps freed blocks for reuse (glibc's, for blocks below its mmap threshold, such as
    /// the shards of the cache's tables) would otherwise hold on to them, and resident memory
    /// would not fall when the cache does. The binary owns the allocator, so it says how.
    pub give_back: Option<fn()>,
}

/// The default memory budget for rows not changed since the last checkpoint: about 1.2 GB of
/// memory all told with a million funded payers paying at random (measured with `farthing
/// bench --only soak`, with the allocator the binary sets up), most of them held and the rest
/// read back from disk when they pay. Memory is kept near it (the least recently used rows
/// go), not emptied past it.
pub const CACHE_BYTES_DEFAULT: usize = 768 << 20;
/// The default checkpoint interval, in history rows (a payment makes one, its row; a top-up
/// two and a refund three, with their transfer records): about 200,000 payments, made and
/// written again while the next ones are made. With a million payers paying at random
/// (`farthing bench --only soak --soak-payments 20000000`, BENCHMARKS.md), 150,000 rows
/// sustained 187k payments/s with a restart after the run of 2.5 s, and 300,000 rows 201k/s
/// with 0.2 GB more resident and a restart of 4 s; this default lies between them.
pub const CHECKPOINT_ROWS_DEFAULT: usize = 200_000;

struct Job {
    command: Command,
    idempotency: Option<IdempotencyClaim>,
    /// The outcome, and whether it is the stored answer of an earlier request with the same
    /// idempotency key.
    reply: oneshot::Sender<Result<(Outcome, bool), ServiceError>>,
}

/// Where the state lives. There is one per service, so the size of its variants is of no
/// concern.
#[allow(clippy::large_enum_variant)]
enum Storage {
    /// The embedded store: the whole state in this process, made durable by the writer's
    /// journal.
    Local(Arc<RwLock<State>>),
    /// A store shared with other processes, which holds the state itself.
    Shared(SharedParts),
}

struct SharedParts {
    store: Arc<dyn SharedStore>,
    /// Merchants and payers by their keys' hashes, as looked up. A merchant's or payer's key is
    /// made with the party and is never removed or given to another, so what is kept here can
    /// never be wrong, and it spares the database one query per request. The operator's key is
    /// never kept: any server started with another admin key replaces it, and every other
    /// server must refuse the old one at once.
    principals: Mutex<HashMap<KeyHash, Principal>>,
    /// The time of this process's latest batch, in microseconds: every batch gets a later one,
    /// so that lists order this process's batches as they were committed.
    last_now: AtomicU64,
    /// When this process next forgets expired idempotency keys.
    next_prune: AtomicU64,
}

/// How often the service looks for holds to expire.
pub const HOLD_EXPIRY_TICK: std::time::Duration = std::time::Duration::from_secs(1);

/// Principals kept at most; the cache starts over when full.
const PRINCIPAL_CACHE_MAX: usize = 100_000;
/// Writer tasks per process on a shared store: while one batch commits, the next is gathered
/// and loaded.
pub const SHARED_WRITERS_DEFAULT: usize = 2;

struct Shared {
    storage: Storage,
    /// The API's questions, answered by whichever store holds the state.
    reads: Arc<dyn Reads>,
    ids: Arc<dyn Ids>,
    config: Config,
    /// API keys of recently created parties, by party id, so that a retried creation answers
    /// with the same key. Kept in memory only: keys never reach the disk.
    created_keys: Mutex<HashMap<u128, (Timestamp, Secret)>>,
    clock: Arc<dyn Clock>,
    metrics: Metrics,
    /// Refusals answered without a record, by idempotency key.
    refusals: refusals::Refusals,
}

/// Counters for `/metrics`.
#[derive(Default)]
pub struct Metrics {
    pub commits: std::sync::atomic::AtomicU64,
    pub records_committed: std::sync::atomic::AtomicU64,
    pub commit_micros_total: std::sync::atomic::AtomicU64,
}

impl Metrics {
    fn count_commit(&self, records: usize, started: Instant) {
        use std::sync::atomic::Ordering::Relaxed;
        self.commits.fetch_add(1, Relaxed);
        self.records_committed.fetch_add(records as u64, Relaxed);
        self.commit_micros_total
            .fetch_add(started.elapsed().as_micros() as u64, Relaxed);
    }
}

/// A handle to the running service; cheap to clone.
#[derive(Clone)]
pub struct Service {
    shared: Arc<Shared>,
    submit: mpsc::Sender<Message>,
    writer: Arc<Mutex<Option<Writers>>>,
}

/// What [`Service::shutdown`] waits for.
enum Writers {
    /// The embedded store's writer thread.
    Thread(JoinHandle<()>),
    /// A shared store's writer tasks: each holds a sender; the channel closes when all have
    /// finished.
    Tasks(std::sync::mpsc::Receiver<()>),
}

/// What opening the service found and did.
pub struct Opened {
    pub service: Service,
    /// Records replayed from the journal.
    pub records_replayed: u64,
    /// An operator key made because none existed and none was given: print it once.
    pub generated_operator_key: Option<Secret>,
}

impl Service {
    /// Replays `journal`, starts the writer, and makes sure an operator key exists: `operator_key`
    /// when given (replacing an older one), else a new one when the journal has none. The
    /// whole state is kept in memory.
    pub async fn open(
        journal: Box<dyn Journal>,
        config: Config,
        clock: Arc<dyn Clock>,
        ids: Arc<dyn Ids>,
        operator_key: Option<Secret>,
    ) -> Result<Opened, ServiceError> {
        Service::open_local(journal, None, config, clock, ids, operator_key).await
    }

    /// [`Service::open`] with the state as a cache over the disk `cache.checkpoints` keeps:
    /// opening loads the last checkpoint and replays only the journal after it, and memory
    /// holds what changed since the last checkpoint and about `cache.cache_bytes` more.
    pub async fn open_cached(
        journal: Box<dyn Journal>,
        cache: CacheOptions,
        config: Config,
        clock: Arc<dyn Clock>,
        ids: Arc<dyn Ids>,
        operator_key: Option<Secret>,
    ) -> Result<Opened, ServiceError> {
        Service::open_local(journal, Some(cache), config, clock, ids, operator_key).await
    }

    async fn open_local(
        mut journal: Box<dyn Journal>,
        cache: Option<CacheOptions>,
        config: Config,
        clock: Arc<dyn Clock>,
        ids: Arc<dyn Ids>,
        operator_key: Option<Secret>,
    ) -> Result<Opened, ServiceError> {
        let (state, records_replayed) =
            tokio::task::block_in_place(|| replay(&mut *journal, cache.as_ref()))?;
        let (submit, receive) = mpsc::channel(QUEUE_DEPTH_MAX);
        let state = Arc::new(RwLock::new(state));
        let shared = Arc::new(Shared {
            reads: Arc::new(local_reads::StateReads(state.clone())),
            storage: Storage::Local(state),
            ids,
            config,
            created_keys: Mutex::new(HashMap::new()),
            clock: clock.clone(),
            metrics: Metrics::default(),
            refusals: refusals::Refusals::default(),
        });
        let checkpointer = match cache {
            Some(options) => Some(Checkpointer::start(options, submit.clone())?),
            None => None,
        };
        let writer = {
            let shared = shared.clone();
            std::thread::Builder::new()
                .name("farthing-writer".into())
                .spawn(move || {
                    // A panic here means a broken invariant while applying records: the state
                    // in memory can no longer be trusted, but the journal still can. Stopping
                    // the process (and replaying on restart) beats serving from a poisoned
                    // lock. Nothing that was not yet durable was acknowledged.
                    let applied = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                        write_loop(shared, journal, checkpointer, clock, receive)
                    }));
                    if applied.is_err() {
                        tracing::error!("the writer panicked; stopping the process");
                        std::process::abort();
                    }
                })
                .map_err(StoreError::Io)?
        };
        let service = Service {
            shared,
            submit,
            writer: Arc::new(Mutex::new(Some(Writers::Thread(writer)))),
        };
        service.start_expiring_holds();
        let generated_operator_key = service.ensure_operator_key(operator_key).await?;
        Ok(Opened {
            service,
            records_replayed,
            generated_operator_key,
        })
    }

    /// Starts `writers` writer tasks (at least one) over a store shared with other processes,
    /// and makes sure an operator key exists, as [`Service::open`] does. Call it within a
    /// Tokio runtime, which runs the writers.
    pub async fn open_shared(
        store: Arc<dyn SharedStore>,
        config: Config,
        clock: Arc<dyn Clock>,
        ids: Arc<dyn Ids>,
        operator_key: Option<Secret>,
        writers: usize,
    ) -> Result<Opened, ServiceError> {
        let (submit, receive) = mpsc::channel(QUEUE_DEPTH_MAX);
        let shared = Arc::new(Shared {
            reads: store.clone(),
            storage: Storage::Shared(SharedParts {
                store,
                principals: Mutex::new(HashMap::new()),
                last_now: AtomicU64::new(0),
                next_prune: AtomicU64::new(0),
            }),
            ids,
            config,
            created_keys: Mutex::new(HashMap::new()),
            clock,
            metrics: Metrics::default(),
            refusals: refusals::Refusals::default(),
        });
        let receive = Arc::new(tokio::sync::Mutex::new(receive));
        let (finished, all_finished) = std::sync::mpsc::channel();
        for _ in 0..writers.max(1) {
            let shared = shared.clone();
            let receive = receive.clone();
            let finished = finished.clone();
            tokio::spawn(async move {
                shared_write_loop(&shared, &receive).await;
                drop(finished);
            });
        }
        drop(finished);
        let service = Service {
            shared,
            submit,
            writer: Arc::new(Mutex::new(Some(Writers::Tasks(all_finished)))),
        };
        service.start_expiring_holds();
        let generated_operator_key = service.ensure_operator_key(operator_key).await?;
        Ok(Opened {
            service,
            records_replayed: 0,
            generated_operator_key,
        })
    }

    /// Records `operator_key` when given (replacing an older one), else a new key when none
    /// exists; returns the key made here, to be printed once.
    async fn ensure_operator_key(
        &self,
        operator_key: Option<Secret>,
    ) -> Result<Option<Secret>, ServiceError> {
        let (key_to_set, generated) = match operator_key {
            Some(key) => match self.lookup_principal(&key.hash()).await? {
                Some(Principal::Operator) => (None, None),
                Some(Principal::Merchant(_)) => {
                    return Err(ServiceError::OperatorKeyTaken("merchant"));
                }
                Some(Principal::Payer(_)) => return Err(ServiceError::OperatorKeyTaken("payer")),
                None => (Some(key), None),
            },
            None if !self.has_operator_key().await? => {
                if !self.is_local() {
                    return Err(ServiceError::OperatorKeyRequired);
                }
                let key = Secret::generate_api_key("op");
                (Some(key.clone()), Some(key))
            }
            None => (None, None),
        };
        if let Some(key) = key_to_set {
            let key_hash = key.hash();
            self.submit(Command::SetOperatorKey { key_hash }, None)
                .await?;
        }
        Ok(generated)
    }

    async fn has_operator_key(&self) -> Result<bool, ServiceError> {
        Ok(self.shared.reads.has_operator_key().await?)
    }

    /// Who holds the key with this hash, asking the store itself.
    async fn lookup_principal(
        &self,
        key_hash: &KeyHash,
    ) -> Result<Option<Principal>, ServiceError> {
        Ok(self.shared.reads.principal(key_hash).await?)
    }

    /// Whether the store can serve now: always for the embedded store, whose state is in this
    /// process; a round trip for a shared store.
    pub async fn check_storage(&self) -> Result<(), ServiceError> {
        if let Storage::Shared(_) = &self.shared.storage {
            self.has_operator_key().await?;
        }
        Ok(())
    }

    /// Whether the state is held in this process (the embedded store).
    pub fn is_local(&self) -> bool {
        matches!(self.shared.storage, Storage::Local(_))
    }

    /// Forgets idempotency keys older than [`IDEMPOTENCY_TTL_SECS`] now, rather than at the
    /// next hourly prune: for a test clock that has just jumped.
    pub async fn prune_expired_now(&self) -> Result<(), ServiceError> {
        let before = Timestamp(
            self.now()
                .0
                .saturating_sub(IDEMPOTENCY_TTL_SECS * 1_000_000),
        );
        self.submit(Command::PruneIdempotencyKeys { before }, None)
            .await
            .map(|_| ())
    }

    /// Starts the task that expires holds: every [`HOLD_EXPIRY_TICK`], an
    /// [`HoldCommand::Expire`] when one is due (every server of a shared store looks; the
    /// first to expire a hold does, and the others find it settled). It ends when the
    /// service stops.
    ///
    /// Between ticks it holds the service only weakly: once the service is shut down and
    /// dropped, nothing of it (the store, the data directory's lock) outlives it waiting for
    /// the next tick.
    fn start_expiring_holds(&self) {
        let shared = Arc::downgrade(&self.shared);
        let submit = self.submit.downgrade();
        let writer = Arc::downgrade(&self.writer);
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(HOLD_EXPIRY_TICK);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                let (Some(shared), Some(submit), Some(writer)) =
                    (shared.upgrade(), submit.upgrade(), writer.upgrade())
                else {
                    return;
                };
                let service = Service {
                    shared,
                    submit,
                    writer,
                };
                match service.expire_holds_now().await {
                    Ok(()) => {}
                    Err(ServiceError::ShuttingDown) => return,
                    Err(error) => {
                        tracing::warn!(%error, "could not expire holds; trying again");
                    }
                }
            }
        });
    }

    /// Voids every hold whose deadline has passed, now: what the expiry task does each tick,
    /// and what a test clock's jump asks for at once.
    pub async fn expire_holds_now(&self) -> Result<(), ServiceError> {
        loop {
            let at = self.now();
            let due = self
                .shared
                .reads
                .next_hold_deadline()
                .await?
                .is_some_and(|deadline| deadline <= at);
            if !due {
                return Ok(());
            }
            let executed = self
                .submit(Command::from(HoldCommand::Expire { at }), None)
                .await?;
            match executed.outcome {
                Outcome::Room(RoomOutcome::Holds(HoldOutcome::Expired { count }))
                    if count == EXPIRED_PER_COMMAND_MAX as usize => {}
                _ => return Ok(()),
            }
        }
    }

    /// The time now, on the service's clock.
    pub fn now(&self) -> Timestamp {
        self.shared.clock.now()
    }

    pub fn config(&self) -> &Config {
        &self.shared.config
    }

    pub fn metrics(&self) -> &Metrics {
        &self.shared.metrics
    }

    /// The counts a shared store keeps of its own work (none for the embedded store).
    pub fn store_counters(&self) -> Vec<farthing_store::StoreCounter> {
        match &self.shared.storage {
            Storage::Local(_) => Vec::new(),
            Storage::Shared(parts) => parts.store.counters(),
        }
    }

    /// Reads the embedded store's state. Everything in it is durable: the writer applies
    /// records only after the journal has them.
    ///
    /// # Panics
    ///
    /// On a shared store, whose state is not held in this process: see [`Service::is_local`].
    pub fn read_now<T>(&self, read: impl FnOnce(&State) -> T) -> T {
        read(&self.state())
    }

    /// [`Service::read_now`], in the shape of the other reads.
    pub async fn read<T>(&self, read: impl FnOnce(&State) -> T) -> Result<T, ServiceError> {
        Ok(read(&self.state()))
    }

    fn state(&self) -> RwLockReadGuard<'_, State> {
        match &self.shared.storage {
            Storage::Local(state) => state
                .read()
                .expect("the writer never panics holding the lock"),
            Storage::Shared(_) => panic!("a shared store's state is not held in this process"),
        }
    }

    /// Who holds `key`.
    pub async fn authenticate(&self, key: &Secret) -> Result<Option<Principal>, ServiceError> {
        let key_hash = key.hash();
        let Storage::Shared(parts) = &self.shared.storage else {
            return Ok(self.shared.reads.principal(&key_hash).await?);
        };
        if let Some(principal) = parts
            .principals
            .lock()
            .expect("principal cache lock")
            .get(&key_hash)
        {
            return Ok(Some(*principal));
        }
        let found = parts.store.principal(&key_hash).await?;
        if let Some(principal @ (Principal::Merchant(_) | Principal::Payer(_))) = found {
            let mut cache = parts.principals.lock().expect("principal cache lock");
            if cache.len() >= PRINCIPAL_CACHE_MAX {
                cache.clear();
            }
            cache.insert(key_hash, principal);
        }
        Ok(found)
    }

    /// A payer's available balances by currency; `None` for an unknown payer.
    pub async fn payer_balances(
        &self,
        payer: PayerId,
    ) -> Result<Option<Vec<(Currency, i128)>>, ServiceError> {
        Ok(self.shared.reads.payer_balances(payer).await?)
    }

    /// A merchant's available balances by currency; `None` for an unknown merchant.
    pub async fn merchant_balances(
        &self,
        merchant: MerchantId,
    ) -> Result<Option<Vec<(Currency, i128)>>, ServiceError> {
        Ok(self.shared.reads.merchant_balances(merchant).await?)
    }

    /// The payment, when `caller` may see it (its payer, its merchant, or the operator).
    pub async fn payment(
        &self,
        caller: Principal,
        id: PaymentId,
    ) -> Result<Option<Payment>, ServiceError> {
        let payment = self.shared.reads.payment(id).await?;
        Ok(payment.filter(|payment| State::may_see(caller, payment)))
    }

    /// The state row of a room's kind `K` under `id`, from whichever store: what a room's
    /// routes read its objects with. Who may see it is the room's to decide.
    pub async fn row<K: Kind>(&self, id: u128) -> Result<Option<K::Row>, ServiceError> {
        let Some(stored) = self.shared.reads.row(K::TAG, id).await? else {
            return Ok(None);
        };
        match stored.decode::<K>() {
            Some(Ok(row)) => Ok(Some(row)),
            Some(Err(error)) => Err(StoreError::Database(format!(
                "a {} row does not read: {error}",
                K::TABLE
            ))
            .into()),
            None => Err(StoreError::Database(format!(
                "a {} row came back under another tag",
                K::TABLE
            ))
            .into()),
        }
    }

    /// Payments `caller` may see, newest first, after `starting_after`; `None` when the
    /// cursor is not one of them.
    pub async fn list_payments(
        &self,
        caller: Principal,
        limit: usize,
        starting_after: Option<PaymentId>,
    ) -> Result<Option<Page<Payment>>, ServiceError> {
        Ok(self
            .shared
            .reads
            .list_payments(caller, limit, starting_after)
            .await?)
    }

    /// A payer's statement, newest first, after the line for `starting_after`.
    pub async fn payer_entries(
        &self,
        payer: PayerId,
        limit: usize,
        starting_after: Option<EntryObject>,
    ) -> Result<StatementPage, ServiceError> {
        Ok(self
            .shared
            .reads
            .payer_entries(payer, limit, starting_after)
            .await?)
    }

    pub fn next_id(&self) -> u128 {
        self.shared.ids.next_id()
    }

    fn transfer_ids(&self) -> [TransferId; 2] {
        [TransferId(self.next_id()), TransferId(self.next_id())]
    }

    /// The stored answer of an earlier request with the same idempotency key, on the embedded
    /// store: from the state, or from the refusals remembered in memory.
    fn known_locally(&self, claim: &IdempotencyClaim) -> Option<Outcome> {
        self.read_now(
            |state| match state.idempotency_lookup(&claim.key, &claim.fingerprint) {
                IdempotencyLookup::New => None,
                IdempotencyLookup::Replay(outcome) => Some(outcome.clone()),
                IdempotencyLookup::Reused => {
                    Some(Outcome::Rejected(Rejection::IdempotencyKeyReused))
                }
            },
        )
        .or_else(|| self.shared.refusals.answer(claim))
    }

    /// Applies `command` durably and returns its outcome. With an idempotency claim, a
    /// completed earlier request with the same key answers instead.
    pub async fn submit(
        &self,
        command: Command,
        idempotency: Option<IdempotencyClaim>,
    ) -> Result<Executed, ServiceError> {
        if let Some(claim) = &idempotency {
            let known = match &self.shared.storage {
                Storage::Local(_) => self.known_locally(claim),
                Storage::Shared(parts) => parts.store.idempotency(&claim.key).await?.map(|found| {
                    if found.fingerprint == claim.fingerprint {
                        found.outcome
                    } else {
                        Outcome::Rejected(Rejection::IdempotencyKeyReused)
                    }
                }),
            };
            if let Some(outcome) = known {
                let replayed =
                    !matches!(outcome, Outcome::Rejected(Rejection::IdempotencyKeyReused));
                return Ok(self.executed(outcome, idempotency.is_some(), replayed));
            }
        }
        let (reply, answer) = oneshot::channel();
        self.submit
            .send(Message::Job(Job {
                command,
                idempotency: idempotency.clone(),
                reply,
            }))
            .await
            .map_err(|_| ServiceError::ShuttingDown)?;
        // The writer says whether it answered from an earlier request with the same key that
        // was still in flight when this one checked.
        let (outcome, replayed) = answer.await.map_err(|_| ServiceError::ShuttingDown)??;
        Ok(self.executed(outcome, idempotency.is_some(), replayed))
    }

    /// The answer to a request; a creation under an idempotency key carries the new party's
    /// API key, from the cache, so that every request with that key shows the same one.
    fn executed(&self, outcome: Outcome, with_key: bool, replayed: bool) -> Executed {
        let api_key = match created_party(&outcome) {
            Some(party) if with_key => self
                .shared
                .created_keys
                .lock()
                .expect("key cache lock")
                .get(&party)
                .map(|(_, key)| key.clone()),
            _ => None,
        };
        Executed {
            outcome,
            replayed,
            api_key,
        }
    }

    /// Creates a merchant with a fresh API key.
    pub async fn create_merchant(
        &self,
        name: String,
        fee: Option<FeeSchedule>,
        idempotency: Option<IdempotencyClaim>,
    ) -> Result<Executed, ServiceError> {
        let key = Secret::generate_api_key("mer");
        let id = MerchantId::from_u128(self.next_id());
        let command = Command::CreateMerchant {
            id,
            name,
            key_hash: key.hash(),
            fee: fee.unwrap_or(self.shared.config.default_fee),
        };
        self.create_party(id.to_u128(), command, key, idempotency)
            .await
    }

    /// Creates a payer with a fresh API key.
    pub async fn create_payer(
        &self,
        name: String,
        idempotency: Option<IdempotencyClaim>,
    ) -> Result<Executed, ServiceError> {
        let key = Secret::generate_api_key("pyr");
        let id = PayerId::from_u128(self.next_id());
        let command = Command::CreatePayer {
            id,
            name,
            key_hash: key.hash(),
        };
        self.create_party(id.to_u128(), command, key, idempotency)
            .await
    }

    /// Submits the creation of `party` (whose API key is `key`) and answers with the key when
    /// the party was made.
    async fn create_party(
        &self,
        party: u128,
        command: Command,
        key: Secret,
        idempotency: Option<IdempotencyClaim>,
    ) -> Result<Executed, ServiceError> {
        if idempotency.is_some() {
            // Cached before the command runs: a concurrent request with the same idempotency
            // key can be answered with this party (as a replay) before this request is.
            let now = self.shared.clock.now();
            let mut keys = self.shared.created_keys.lock().expect("key cache lock");
            // Kept as long as the idempotency key itself, then forgotten.
            let oldest = Timestamp(now.0.saturating_sub(IDEMPOTENCY_TTL_SECS * 1_000_000));
            keys.retain(|_, (made, _)| *made >= oldest);
            keys.insert(party, (now, key.clone()));
        }
        let mut executed = self.submit(command, idempotency.clone()).await?;
        let made = created_party(&executed.outcome) == Some(party);
        if made {
            executed.api_key = Some(key);
        } else if idempotency.is_some() {
            // Replayed or refused: this party was never made.
            self.shared
                .created_keys
                .lock()
                .expect("key cache lock")
                .remove(&party);
        }
        Ok(executed)
    }

    pub async fn topup(
        &self,
        payer: PayerId,
        amount: Amount,
        currency: Currency,
        source: FundingSource,
        idempotency: Option<IdempotencyClaim>,
    ) -> Result<Executed, ServiceError> {
        let command = Command::Topup {
            id: TopupId::from_u128(self.next_id()),
            payer,
            amount,
            currency,
            source,
            transfer_id: TransferId(self.next_id()),
        };
        self.submit(command, idempotency).await
    }

    /// A fresh payment command (ids chosen, not yet applied).
    pub fn pay_command(
        &self,
        payer: PayerId,
        merchant: MerchantId,
        amount: Amount,
        currency: Currency,
        description: Option<String>,
        reference: Option<String>,
    ) -> PayCommand {
        PayCommand {
            id: PaymentId::from_u128(self.next_id()),
            payer,
            merchant,
            amount,
            currency,
            description,
            reference,
            transfer_ids: self.transfer_ids(),
        }
    }

    pub async fn refund(
        &self,
        caller: Principal,
        payment: PaymentId,
        amount: Option<Amount>,
        idempotency: Option<IdempotencyClaim>,
    ) -> Result<Executed, ServiceError> {
        let command = Command::Refund {
            id: RefundId::from_u128(self.next_id()),
            payment,
            amount,
            caller,
            transfer_ids: self.transfer_ids(),
        };
        self.submit(command, idempotency).await
    }

    /// Stops taking commands, lets the writer commit what is queued, and waits for it.
    /// Other handles may still be alive (a demo, a test): they get `ShuttingDown` afterwards.
    pub fn shutdown(self) {
        let Service { submit, writer, .. } = self;
        loop {
            match submit.try_send(Message::Stop) {
                Ok(()) | Err(mpsc::error::TrySendError::Closed(_)) => break,
                Err(mpsc::error::TrySendError::Full(_)) => {
                    std::thread::sleep(std::time::Duration::from_millis(1));
                }
            }
        }
        match writer.lock().expect("writer handle lock").take() {
            Some(Writers::Thread(handle)) => {
                let _ = handle.join();
            }
            Some(Writers::Tasks(all_finished)) => {
                // Closed once every writer task has dropped its sender.
                let _ = all_finished.recv();
            }
            None => {}
        }
    }
}

/// The id of the merchant or payer an outcome made.
fn created_party(outcome: &Outcome) -> Option<u128> {
    match outcome {
        Outcome::MerchantCreated(merchant) => Some(merchant.id.to_u128()),
        Outcome::PayerCreated(payer) => Some(payer.id.to_u128()),
        _ => None,
    }
}

/// Rebuilds the embedded store's state from `journal`: all of it for a whole state; for a
/// cache, the last checkpoint and the records after it. A long journal after the checkpoint
/// (an installation from before checkpoints, or a long run cut short) is checkpointed as it
/// replays, so that memory stays bounded while it does.
fn replay(
    journal: &mut dyn Journal,
    cache: Option<&CacheOptions>,
) -> Result<(State, u64), ServiceError> {
    let Some(cache) = cache else {
        let mut state = State::new();
        let count = journal.replay(&mut |record| {
            state.apply(&record);
        })?;
        return Ok((state, count));
    };
    let mut state = State::cache_over(cache.checkpoints.disk()).map_err(StoreError::from)?;
    let mut failed: Option<StoreError> = None;
    let mut checkpointed = None;
    let count = journal.replay_from(state.records_applied(), &mut |record| {
        if failed.is_some() {
            return;
        }
        let done = state
            .load_for(std::slice::from_ref(&record))
            .map_err(StoreError::from)
            .and_then(|()| {
                state.apply(&record);
                if state.young_rows() >= cache.checkpoint_rows {
                    let checkpoint = state.freeze();
                    cache.checkpoints.write(&checkpoint)?;
                    state.checkpoint_written(checkpoint.position);
                    state.forget_unchanged();
                    checkpointed = Some(checkpoint.position);
                }
                Ok(())
            });
        if let Err(error) = done {
            failed = Some(error);
        }
    })?;
    if let Some(error) = failed {
        return Err(error.into());
    }
    if let Some(position) = checkpointed {
        journal.trim(position)?;
        // Rows were let go after each checkpoint: once at the end is enough.
        if let Some(give_back) = cache.give_back {
            give_back();
        }
    }
    Ok((state, count))
}

/// [`State::load_for`] by the writer, for the jobs of one commit: what to read is found under
/// the read lock (readers go on), and only what was read is put in under the write lock.
fn load_for_jobs(state: &RwLock<State>, jobs: &[Job]) -> Result<(), StoreError> {
    for _ in 0..LOAD_ROUNDS_MAX {
        let fetched = state.read().expect("state lock").fetch_for(
            jobs.iter()
                .map(|job| (job.idempotency.as_ref(), &job.command)),
        )?;
        if fetched.is_empty() {
            return Ok(());
        }
        locked(state, "load", |state| state.load_fetched(fetched))?;
    }
    Ok(())
}

/// A step of the writer long enough for requests to feel it: a hold of the state's write lock
/// (readers and the next commit wait behind it), or a commit's append (its requests do).
const LONG_STEP: std::time::Duration = std::time::Duration::from_millis(100);

/// Runs `step` under the state's write lock, and notes in the log (at `info`) a hold past
/// [`LONG_STEP`], naming the step.
fn locked<T>(
    state: &RwLock<State>,
    step_name: &'static str,
    step: impl FnOnce(&mut State) -> T,
) -> T {
    let mut state = state.write().expect("state lock");
    let began = Instant::now();
    let out = step(&mut state);
    let held = began.elapsed();
    if held >= LONG_STEP {
        tracing::info!(
            step = step_name,
            millis = held.as_millis() as u64,
            "the state was locked long enough for requests to wait"
        );
    }
    out
}

/// Reads from disk what `needs` lists and memory lacks, and puts it in: one part of what a
/// held-back job reads, ahead of its commit (which looks again if a row has left memory
/// since reading began).
fn read_ahead(state: &RwLock<State>, needs: &Needs) -> Result<(), StoreError> {
    let fetched = state.read().expect("state lock").fetch_needs(needs)?;
    if !fetched.is_empty() {
        locked(state, "read ahead", |state| state.load_fetched(fetched))?;
    }
    Ok(())
}

/// Writes checkpoints on a thread of its own, so that neither the writer nor readers wait for
/// the disk, and tells the writer when each is written.
///
/// While one is written the writer goes on, up to a bound: past one interval of history made
/// since it began, each commit first waits a little for it, in proportion to the payments it
/// holds (a full batch up to [`PACE_MAX`]), and at [`YOUNG_CHECKPOINTS_MAX`] intervals the
/// writer waits for it whole. Without that, a writer faster than the disk would grow the
/// history in memory for as long as it stays faster; with it, memory is bounded and the
/// sustained rate is what the disk keeps up with.
struct Checkpointer {
    options: CacheOptions,
    send: std::sync::mpsc::Sender<Checkpoint>,
    /// The positions of checkpoints written, in order.
    written: std::sync::mpsc::Receiver<u64>,
    thread: Option<JoinHandle<()>>,
    /// Whether a checkpoint is being written.
    in_flight: bool,
    /// The shard of the cache's tables that forgetting goes on from: it goes round them all.
    hand: usize,
    /// Memory being brought back to its budget, if it is.
    forgetting: Option<Forgetting>,
}

/// Memory being brought back under its budget a few shards at a time ([`Checkpointer::forget_some`]).
struct Forgetting {
    /// Rows unused for at least this many rounds go: it halves after each turn of the hand
    /// that leaves memory above its mark, down to 0 (every row not changed).
    unused_for: u32,
    /// Shards gone over since `unused_for` last changed.
    visited: usize,
    held_before: usize,
    began: Instant,
    /// The time the lock was held, all told and at most at once.
    locked: std::time::Duration,
    longest: std::time::Duration,
}

/// How recently used a row may be, at most, in the first turn of forgetting: rows unused for
/// this many rounds of changes (checkpoints) go first.
const FORGET_UNUSED_FOR_FIRST: u32 = 8;
/// Shards of the cache's tables let go in one step: a divisor of [`CACHE_SHARDS`].
const FORGET_SHARDS_STEP: usize = 2;
const _: () = assert!(CACHE_SHARDS.is_multiple_of(FORGET_SHARDS_STEP));
/// The longest one hold of the state lock for forgetting: shards are let go a step at a time
/// until it has passed, and the writer commits between two holds.
const FORGET_HOLD: std::time::Duration = std::time::Duration::from_millis(10);

/// Memory let go until what it holds is this far under its budget, so that forgetting does
/// not begin again at the next checkpoint.
fn forget_mark(budget: usize) -> usize {
    budget - budget / 8
}

/// How many checkpoint intervals of history the writer makes while one checkpoint is written
/// before it waits for it.
const YOUNG_CHECKPOINTS_MAX: usize = 2;
/// The longest a commit of a full batch waits for the checkpoint being written before the
/// bound: past one interval, it waits up to this, more the nearer the bound; a smaller commit
/// waits its share of it.
const PACE_MAX: std::time::Duration = std::time::Duration::from_millis(40);

/// Whether a checkpoint is due with `young` history rows made since the last one began, at
/// `interval` rows between checkpoints: at one interval; while other jobs wait, half an
/// interval later, so that they are committed before freezing holds the lock, but no later.
fn checkpoint_due(young: usize, interval: usize, others_waiting: bool) -> bool {
    let due = if others_waiting {
        interval + interval / 2
    } else {
        interval
    };
    young >= due
}

/// How long a commit of `payments` waits for the checkpoint being written, when the history
/// made since it began is `over` rows past one interval, of the `span` up to the bound: the
/// further it is, the longer (up to [`PACE_MAX`] near the bound), so the writer slows to the
/// disk's pace in small steps rather than stopping all at once at the bound; and in
/// proportion to the payments it holds, a full batch the whole of it, so a commit of a few
/// single payments barely waits.
fn pace(over: usize, span: usize, payments: usize) -> std::time::Duration {
    let share = payments.min(PAYMENTS_PER_BATCH_MAX) as u128;
    let nanos = PACE_MAX.as_nanos() * over.min(span) as u128 * share
        / (span.max(1) as u128 * PAYMENTS_PER_BATCH_MAX as u128);
    std::time::Duration::from_nanos(u64::try_from(nanos).expect("at most PACE_MAX"))
}

/// How long a failed checkpoint waits before it is tried again.
const CHECKPOINT_RETRY: std::time::Duration = std::time::Duration::from_secs(5);

impl Checkpointer {
    fn start(
        options: CacheOptions,
        done: mpsc::Sender<Message>,
    ) -> Result<Checkpointer, StoreError> {
        let (send, receive) = std::sync::mpsc::channel::<Checkpoint>();
        let (written_send, written) = std::sync::mpsc::channel::<u64>();
        let checkpoints = options.checkpoints.clone();
        let thread = std::thread::Builder::new()
            .name("farthing-checkpoints".into())
            .spawn(move || {
                for checkpoint in receive {
                    let started = Instant::now();
                    // The journal keeps every record until the checkpoint is written, so a
                    // failure loses nothing: it is tried again until the disk takes it.
                    while let Err(error) = checkpoints.write(&checkpoint) {
                        tracing::error!(%error, position = checkpoint.position, "a checkpoint failed; trying again");
                        std::thread::sleep(CHECKPOINT_RETRY);
                    }
                    tracing::info!(
                        position = checkpoint.position,
                        history_rows = checkpoint.history_len(),
                        millis = started.elapsed().as_millis() as u64,
                        "checkpoint written"
                    );
                    let position = checkpoint.position;
                    drop(checkpoint);
                    // Refused once the writer has stopped: the journal replays it then.
                    if written_send.send(position).is_err() {
                        return;
                    }
                    // Wakes a writer waiting for work; a full queue means it is busy, and it
                    // looks at `written` before each commit anyway.
                    let _ = done.try_send(Message::CheckpointWritten);
                }
            })?;
        Ok(Checkpointer {
            options,
            send,
            written,
            thread: Some(thread),
            in_flight: false,
            hand: 0,
            forgetting: None,
        })
    }

    /// Begins a checkpoint if enough history was made since the last one and none is being
    /// written. Under the write lock: freezing is a move plus a copy of the state rows changed,
    /// tens of milliseconds with a million payers, so while other jobs wait (`others_waiting`)
    /// it waits for a later commit, up to half an interval more.
    fn maybe_begin(&mut self, state: &RwLock<State>, others_waiting: bool) {
        // Asked under the read lock: only this thread changes the state, so the answer holds
        // until it takes the write lock, which most commits then need not wait for.
        if self.in_flight
            || !checkpoint_due(
                state.read().expect("state lock").young_rows(),
                self.options.checkpoint_rows,
                others_waiting,
            )
        {
            return;
        }
        let mut state = state.write().expect("state lock");
        let began = Instant::now();
        let checkpoint = state.freeze();
        tracing::info!(
            position = checkpoint.position,
            micros = began.elapsed().as_micros() as u64,
            "checkpoint begun (state locked)"
        );
        self.in_flight = true;
        self.send
            .send(checkpoint)
            .expect("the checkpoint thread outlives the writer");
    }

    /// How long a commit of `payments` waits for the checkpoint being written, by the history
    /// made since it began: nothing within one interval; past it, a pause in proportion
    /// ([`pace`]); at [`YOUNG_CHECKPOINTS_MAX`] intervals, until it is written. A commit of
    /// fewer than [`LARGE_JOB_PAYMENTS`] adds little, and waits whole only one interval
    /// later: single payments are not held behind a checkpoint that the batches beside them
    /// outran.
    fn hold_for(&self, state: &RwLock<State>, payments: usize) -> Hold {
        if !self.in_flight || payments == 0 {
            return Hold::None;
        }
        let young = state.read().expect("state lock").young_rows();
        let interval = self.options.checkpoint_rows;
        let bound = if payments >= LARGE_JOB_PAYMENTS {
            YOUNG_CHECKPOINTS_MAX
        } else {
            YOUNG_CHECKPOINTS_MAX + 1
        } * interval;
        if young >= bound {
            Hold::UntilWritten
        } else if young > interval {
            let span = (YOUNG_CHECKPOINTS_MAX - 1) * interval;
            Hold::For(pace(young - interval, span, payments))
        } else {
            Hold::None
        }
    }

    /// Waits up to `timeout` (for ever with `None`) for the checkpoint being written, and
    /// takes it in if it was: whether the wait is over (written, or never to be).
    fn wait_written(
        &mut self,
        timeout: Option<std::time::Duration>,
        journal: &mut dyn Journal,
        state: &RwLock<State>,
    ) -> bool {
        if !self.in_flight {
            return true;
        }
        use std::sync::mpsc::RecvTimeoutError;
        let began = Instant::now();
        let written = match timeout {
            None => self
                .written
                .recv()
                .map_err(|_| RecvTimeoutError::Disconnected),
            Some(timeout) => self.written.recv_timeout(timeout),
        };
        match written {
            Ok(position) => {
                tracing::debug!(
                    micros = began.elapsed().as_micros() as u64,
                    "the writer waited for a checkpoint"
                );
                self.written(position, journal, state);
                true
            }
            Err(RecvTimeoutError::Timeout) => false,
            // The checkpoint thread is gone, so nothing will be written: waiting for it would
            // stop the writer for good. The journal keeps every record, as it does while a
            // checkpoint fails.
            Err(RecvTimeoutError::Disconnected) => true,
        }
    }

    /// Takes in the checkpoints written since last asked, after waiting for the one being
    /// written as long as a commit of `payments` must ([`Checkpointer::hold_for`]).
    fn catch_up(&mut self, journal: &mut dyn Journal, state: &RwLock<State>, payments: usize) {
        match self.hold_for(state, payments) {
            Hold::None => {}
            Hold::For(pause) => {
                self.wait_written(Some(pause), journal, state);
            }
            Hold::UntilWritten => {
                self.wait_written(None, journal, state);
            }
        }
        self.take_written(journal, state);
    }

    /// Takes in the checkpoints written since last asked, and goes on forgetting.
    fn take_written(&mut self, journal: &mut dyn Journal, state: &RwLock<State>) {
        while let Ok(position) = self.written.try_recv() {
            self.written(position, journal, state);
        }
        self.forget_some(state);
    }

    /// Lets rows go, a few shards at a time from the hand, under one short hold of the lock
    /// ([`FORGET_HOLD`]), while memory is being brought back under its budget. Only while no
    /// checkpoint is being written: rows changed before it began are not on disk yet.
    fn forget_some(&mut self, state: &RwLock<State>) {
        if self.in_flight {
            return;
        }
        let Some(forgetting) = &mut self.forgetting else {
            return;
        };
        let mark = forget_mark(self.options.cache_bytes);
        let began = Instant::now();
        let mut locked = state.write().expect("state lock");
        let mut held = locked.held_bytes();
        // Whether a whole turn let go every row not changed, and memory is still above its
        // mark: what it holds changed since the checkpoint began, and stays until the next.
        let mut exhausted = false;
        while held > mark {
            let next = self.hand;
            locked.forget_unused_in(next..next + FORGET_SHARDS_STEP, forgetting.unused_for);
            self.hand = (next + FORGET_SHARDS_STEP) % CACHE_SHARDS;
            forgetting.visited += FORGET_SHARDS_STEP;
            held = locked.held_bytes();
            if forgetting.visited == CACHE_SHARDS {
                if forgetting.unused_for == 0 {
                    exhausted = true;
                    break;
                }
                // A turn left memory above its mark: rows used more recently go too.
                forgetting.unused_for /= 2;
                forgetting.visited = 0;
            }
            if began.elapsed() >= FORGET_HOLD {
                break;
            }
        }
        drop(locked);
        let hold = began.elapsed();
        forgetting.locked += hold;
        forgetting.longest = forgetting.longest.max(hold);
        if held > mark && !exhausted {
            return;
        }
        tracing::info!(
            held_before = forgetting.held_before,
            held_after = held,
            millis = forgetting.began.elapsed().as_millis() as u64,
            locked_micros = forgetting.locked.as_micros() as u64,
            longest_micros = forgetting.longest.as_micros() as u64,
            unused_for = forgetting.unused_for,
            "{}",
            if exhausted {
                "memory let go of every row it could; the rest changed since the checkpoint began"
            } else {
                "memory brought back under its budget"
            }
        );
        self.forgetting = None;
        if let Some(give_back) = self.options.give_back {
            let began = Instant::now();
            give_back();
            tracing::info!(
                micros = began.elapsed().as_micros() as u64,
                "freed memory given back"
            );
        }
    }

    /// A checkpoint is on disk: the journal before it goes, its rows are read from disk, and
    /// once memory holds more than its budget, forgetting begins ([`Checkpointer::forget_some`]).
    fn written(&mut self, position: u64, journal: &mut dyn Journal, state: &RwLock<State>) {
        self.in_flight = false;
        if let Err(error) = journal.trim(position) {
            tracing::warn!(%error, position, "could not remove journal segments a checkpoint holds");
        }
        let mut state = state.write().expect("state lock");
        state.checkpoint_written(position);
        let held = state.held_bytes();
        drop(state);
        if held > self.options.cache_bytes && self.forgetting.is_none() {
            self.forgetting = Some(Forgetting {
                unused_for: FORGET_UNUSED_FOR_FIRST,
                visited: 0,
                held_before: held,
                began: Instant::now(),
                locked: std::time::Duration::ZERO,
                longest: std::time::Duration::ZERO,
            });
        }
    }

    /// Waits for the checkpoint being written, if any.
    fn stop(mut self) {
        drop(self.send);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// The writer: gathers waiting jobs, appends them to the journal with one fsync, then applies
/// them and answers. Appending first means the state in memory only ever holds what is
/// durable, and a refused append (a full disk) changes nothing and is answered with
/// `StorageUnavailable`.
///
/// Large jobs (by [`LARGE_JOB_PAYMENTS`]) are held back while what they read is read from
/// disk a part at a time, and while they wait for a checkpoint that is behind ([`HeldBack`]):
/// small jobs queued meanwhile are committed first, so a single payment never waits for a
/// batch's reads, only at most for one part of them, or for a batch already being committed.
fn write_loop(
    shared: Arc<Shared>,
    mut journal: Box<dyn Journal>,
    mut checkpointer: Option<Checkpointer>,
    clock: Arc<dyn Clock>,
    mut receive: mpsc::Receiver<Message>,
) {
    let mut jobs: Vec<Job> = Vec::with_capacity(RECORDS_PER_COMMIT_MAX);
    let mut records: Vec<Record> = Vec::with_capacity(RECORDS_PER_COMMIT_MAX + 1);
    let mut outcomes: Vec<(Outcome, bool)> = Vec::with_capacity(RECORDS_PER_COMMIT_MAX);
    let mut kept: Vec<Job> = Vec::with_capacity(RECORDS_PER_COMMIT_MAX);
    // Time never goes backwards in the journal, even across a restart on a clock that did.
    let Storage::Local(state) = &shared.storage else {
        unreachable!("the journal writer runs over the embedded store")
    };
    let mut held = HeldBack::default();
    let mut last_now = state.read().expect("state lock").last_time();
    let mut next_prune = Timestamp(0);
    loop {
        // After a stop, the queue refuses new jobs but still yields those already in it, so
        // everything accepted before the stop is committed and answered. It blocks only when
        // no large job is held back.
        let mut next = if held.jobs.is_empty() {
            match receive.blocking_recv() {
                Some(message) => Some(message),
                None => break,
            }
        } else {
            receive.try_recv().ok()
        };
        while let Some(message) = next.take() {
            match message {
                Message::Job(job) => jobs.push(job),
                Message::Stop => receive.close(),
                Message::CheckpointWritten => {}
            }
            if jobs.len() + held.jobs.len() < RECORDS_PER_COMMIT_MAX {
                next = receive.try_recv().ok();
            }
        }
        let large = |job: &Job| job_payments(&job.command) >= LARGE_JOB_PAYMENTS;
        if jobs.iter().any(large) {
            let (large, small): (Vec<Job>, Vec<Job>) = jobs.drain(..).partition(large);
            jobs.extend(small);
            held.add(large, state);
        }
        let mut paced = false;
        // The held-back jobs at the front of the commit, and when reading for them began.
        let mut read_ahead = None;
        let ready = !held.jobs.is_empty()
            && held.advance(
                state,
                &receive,
                !jobs.is_empty(),
                checkpointer.as_mut(),
                &mut *journal,
            );
        if ready && !jobs.is_empty() && !held.made_way {
            // Small jobs taken beside held-back ones that are ready are committed first, once:
            // a single payment then waits for its own fsync, not for a batch being applied.
            held.made_way = true;
        } else if ready {
            // Queued before the small ones now beside them, they go first.
            read_ahead = held.all_read_since().map(|since| (held.jobs.len(), since));
            jobs.splice(0..0, std::mem::take(&mut held).jobs);
            paced = true;
        }
        if let Some(checkpointer) = &mut checkpointer {
            if paced {
                checkpointer.take_written(&mut *journal, state);
            } else {
                let payments = jobs.iter().map(|job| job_payments(&job.command)).sum();
                checkpointer.catch_up(&mut *journal, state, payments);
            }
        }
        if jobs.is_empty() {
            continue;
        }
        // Unless a row left memory since (a checkpoint written, rows forgotten, keys pruned),
        // what was read ahead is still there, and only the others' reads are looked for.
        let read_ahead_jobs = match read_ahead {
            Some((count, since)) if since == state.read().expect("state lock").evictions() => count,
            _ => 0,
        };
        let started = std::time::Instant::now();
        // Time never goes backwards in the journal, whatever the wall clock does.
        let now = clock.now().max(last_now);
        last_now = now;
        if let Err(error) = load_for_jobs(state, &jobs[read_ahead_jobs..]) {
            tracing::error!(%error, "could not read what a commit needs from disk; answering 503");
            for job in jobs.drain(..) {
                let _ = job.reply.send(Err(ServiceError::StorageUnavailable));
            }
            continue;
        }
        answer_refusals(&shared, state, &mut jobs, &mut kept, now);
        if jobs.is_empty() {
            continue;
        }
        let prunes = now >= next_prune;
        batch_records(&mut jobs, now, prunes, &mut records);
        let appending = Instant::now();
        let appended = journal.append(&records);
        let append_took = appending.elapsed();
        if append_took >= LONG_STEP {
            tracing::info!(
                millis = append_took.as_millis() as u64,
                records = records.len(),
                "a commit's append to the journal took long enough for requests to wait"
            );
        }
        if let Err(error) = appended {
            tracing::error!(%error, "the journal refused an append; answering 503 and going on");
            records.clear();
            for job in jobs.drain(..) {
                let _ = job.reply.send(Err(ServiceError::StorageUnavailable));
            }
            continue;
        }
        if prunes {
            next_prune = now.saturating_add_secs(60 * 60);
        }
        locked(state, "apply", |state| {
            for (index, record) in records.iter().enumerate() {
                // Whether the answer comes from an earlier request with the same key, possibly
                // one earlier in this very batch.
                let replayed = record.idempotency.as_ref().is_some_and(|claim| {
                    matches!(
                        state.idempotency_lookup(&claim.key, &claim.fingerprint),
                        IdempotencyLookup::Replay(_)
                    )
                });
                let outcome = state.apply(record);
                if !(prunes && index == 0) {
                    outcomes.push((outcome, replayed));
                }
            }
            // What the rounds changed is copied for the next checkpoint once there is enough
            // of it, while it is still in the processor's cache, not all at once when the
            // checkpoint begins. Small rounds wait: each copy of an account that every payment
            // changes (a merchant's, the fees') is another row for the checkpoint to write; and
            // once most rows staged have changed again, the checkpoint's beginning copies them.
            if state.changes_unstaged() >= STAGE_ROWS_MIN && state.staging_pays() {
                state.stage_changes();
            }
        });
        shared.metrics.count_commit(records.len(), started);
        records.clear();
        for (job, outcome) in jobs.drain(..).zip(outcomes.drain(..)) {
            let _ = job.reply.send(Ok(outcome));
        }
        // After the answers: beginning a checkpoint holds the state lock for a while, and the
        // commit that made it due need not wait for that.
        if let Some(checkpointer) = &mut checkpointer {
            checkpointer.maybe_begin(state, !receive.is_empty());
        }
    }
    if let Some(checkpointer) = checkpointer {
        checkpointer.stop();
    }
}

/// Accounts and payers changed since their rows were last copied for the next checkpoint at
/// which the writer copies them ([`State::stage_changes`]): a batch's round copies its own;
/// single payments' commits leave theirs until this many have changed.
const STAGE_ROWS_MIN: usize = 1_024;

/// Payments in a job of at least this many make it large: it is held back while what it
/// reads is read ([`HeldBack`]), and small jobs queued beside it are committed first, each
/// answered after its own fsync, not after the batch is applied. The extra fsync costs a
/// fraction of a millisecond against the tens a batch this size takes.
const LARGE_JOB_PAYMENTS: usize = 1_000;
/// Payments whose reads a held-back job reads at a time, between looks at the queue.
const READ_PART_PAYMENTS: usize = 500;
/// The longest a held-back job waits for a checkpoint between looks at the queue.
const HOLD_SLICE: std::time::Duration = std::time::Duration::from_millis(5);

/// The payments a job makes (a batch's items), or one.
fn job_payments(command: &Command) -> usize {
    match command {
        Command::PayBatch(items) => items.len(),
        _ => 1,
    }
}

/// How long a commit waits for the checkpoint being written ([`Checkpointer::hold_for`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Hold {
    None,
    For(std::time::Duration),
    UntilWritten,
}

/// Large jobs waiting to be committed: first what they read is read from disk a part at a
/// time, then they wait as long as a checkpoint being written asks. Each time the writer
/// comes round it takes at least one step (a part read, or a slice of the wait) and goes on
/// while nothing else is queued, so small jobs queued meanwhile wait at most one step, and
/// however many of them come, the large jobs still get done.
#[derive(Default)]
struct HeldBack {
    jobs: Vec<Job>,
    /// What is left to read, a part each.
    to_read: Vec<Needs>,
    /// Once everything is read: how long the commit waits for the checkpoint being written.
    until: Option<Until>,
    /// [`State::evictions`] when reading began, if every part read so far was read whole and
    /// nothing they list is left to be found by a second look.
    read_since: Option<u64>,
    /// Whether, once ready, they let small jobs beside them go first.
    made_way: bool,
}

/// Until when a held-back job waits for the checkpoint being written.
#[derive(Clone, Copy)]
enum Until {
    Time(Instant),
    Written,
}

impl HeldBack {
    /// Holds back `jobs` as well, with what they read split into parts.
    fn add(&mut self, jobs: Vec<Job>, state: &RwLock<State>) {
        let state = state.read().expect("state lock");
        // A state that holds everything reads nothing.
        if state.is_cache() {
            let payments: usize = jobs.iter().map(|job| job_payments(&job.command)).sum();
            let needs = state.needs_of_batch(
                jobs.iter()
                    .map(|job| (job.idempotency.as_ref(), &job.command)),
            );
            if self.jobs.is_empty() {
                self.read_since = Some(state.evictions());
            }
            if needs.incomplete {
                self.read_since = None;
            }
            self.to_read
                .extend(needs.split(payments.div_ceil(READ_PART_PAYMENTS)));
        }
        self.jobs.extend(jobs);
        // What was decided of the wait before these came counted without them.
        self.until = None;
    }

    /// Once every part is read: [`State::evictions`] when reading began. While it stays the
    /// same, memory holds all the held-back jobs read, and their commit need not look again.
    fn all_read_since(&self) -> Option<u64> {
        self.read_since.filter(|_| self.to_read.is_empty())
    }

    /// Goes on with the held-back jobs: one step, and more while no other job waits (in
    /// `queue`, or already taken from it: `others_waiting`). Whether they are ready to be
    /// committed.
    fn advance(
        &mut self,
        state: &RwLock<State>,
        queue: &mpsc::Receiver<Message>,
        others_waiting: bool,
        mut checkpointer: Option<&mut Checkpointer>,
        journal: &mut dyn Journal,
    ) -> bool {
        loop {
            if let Some(part) = self.to_read.pop() {
                if let Err(error) = read_ahead(state, &part) {
                    // The commit reads again what it lacks, and answers 503 if the disk still
                    // refuses.
                    tracing::warn!(%error, "could not read ahead what a large job reads");
                    self.to_read.clear();
                    self.read_since = None;
                }
            } else {
                let Some(checkpointer) = checkpointer.as_deref_mut() else {
                    return true;
                };
                let until = *self.until.get_or_insert_with(|| {
                    let payments = self.jobs.iter().map(|job| job_payments(&job.command)).sum();
                    match checkpointer.hold_for(state, payments) {
                        Hold::None => Until::Time(Instant::now()),
                        Hold::For(pause) => Until::Time(Instant::now() + pause),
                        Hold::UntilWritten => Until::Written,
                    }
                });
                let slice = match until {
                    Until::Written => HOLD_SLICE,
                    Until::Time(deadline) => {
                        let left = deadline.saturating_duration_since(Instant::now());
                        if left.is_zero() {
                            return true;
                        }
                        left.min(HOLD_SLICE)
                    }
                };
                if checkpointer.wait_written(Some(slice), journal, state) {
                    return true;
                }
            }
            if others_waiting || !queue.is_empty() {
                return false;
            }
        }
    }
}

/// A writer over a shared store: takes the jobs waiting (up to [`RECORDS_PER_COMMIT_MAX`]),
/// hands them to the store as one batch, and answers each. Several such tasks take turns at
/// the queue, so one batch is gathered and loaded while another commits. A batch the store
/// cannot apply changes nothing and is answered with `StorageUnavailable`.
async fn shared_write_loop(shared: &Shared, receive: &tokio::sync::Mutex<mpsc::Receiver<Message>>) {
    use std::sync::atomic::Ordering::Relaxed;
    let Storage::Shared(parts) = &shared.storage else {
        unreachable!("shared writers run over a shared store")
    };
    let mut jobs: Vec<Job> = Vec::new();
    let mut records: Vec<Record> = Vec::new();
    loop {
        {
            let mut receive = receive.lock().await;
            match receive.recv().await {
                None => return,
                Some(Message::Job(job)) => jobs.push(job),
                Some(Message::Stop) => receive.close(),
                Some(Message::CheckpointWritten) => {}
            }
            while jobs.len() < RECORDS_PER_COMMIT_MAX {
                match receive.try_recv() {
                    Ok(Message::Job(job)) => jobs.push(job),
                    Ok(Message::Stop) => receive.close(),
                    Ok(Message::CheckpointWritten) => {}
                    Err(_) => break,
                }
            }
        }
        if jobs.is_empty() {
            continue;
        }
        let started = Instant::now();
        let now = batch_time(&parts.last_now, shared.clock.now());
        // One writer in the process claims each hourly prune of expired idempotency keys.
        let prune_due = parts.next_prune.load(Relaxed);
        let prunes = now.0 >= prune_due
            && parts
                .next_prune
                .compare_exchange(
                    prune_due,
                    now.saturating_add_secs(60 * 60).0,
                    Ordering::AcqRel,
                    Relaxed,
                )
                .is_ok();
        batch_records(&mut jobs, now, prunes, &mut records);
        match parts.store.apply(&records).await {
            Ok(answers) => {
                let answers = answers.into_iter().skip(usize::from(prunes));
                for (job, answer) in jobs.drain(..).zip(answers) {
                    let _ = job.reply.send(Ok((answer.outcome, answer.replayed)));
                }
                shared.metrics.count_commit(records.len(), started);
            }
            Err(error) => {
                tracing::error!(%error, records = records.len(), "the store refused a batch; answering 503");
                if prunes {
                    parts.next_prune.store(prune_due, Relaxed);
                }
                for job in jobs.drain(..) {
                    let _ = job.reply.send(Err(ServiceError::StorageUnavailable));
                }
            }
        }
        records.clear();
    }
}

/// Answers, without a journal record, the jobs that the state refuses as it stands (a payment
/// the wallet cannot cover, a declined top-up, a refund of a payment the caller cannot see),
/// and keeps the rest in `jobs`. A refusal moves no money, so it is true as of the state
/// before this batch (all the batch's requests are concurrent, and a refused one can be put
/// first): refusals cost no durable space. A refusal under an idempotency key is remembered in
/// memory, for replays; a key the state already holds is left to `State::apply`, which replays
/// it. Checked here in the writer, which owns the state, so request handlers take no lock.
fn answer_refusals(
    shared: &Shared,
    state: &RwLock<State>,
    jobs: &mut Vec<Job>,
    kept: &mut Vec<Job>,
    now: Timestamp,
) {
    let state = state.read().expect("state lock");
    for job in jobs.drain(..) {
        let answer = match &job.idempotency {
            Some(claim) => match state.idempotency_lookup(&claim.key, &claim.fingerprint) {
                IdempotencyLookup::New => match shared.refusals.answer(claim) {
                    Some(outcome) => {
                        let replayed =
                            !matches!(outcome, Outcome::Rejected(Rejection::IdempotencyKeyReused));
                        Some((outcome, replayed))
                    }
                    None => state.refusal(&job.command).map(|rejection| {
                        shared.refusals.remember(claim, rejection, now);
                        (Outcome::Rejected(rejection), false)
                    }),
                },
                IdempotencyLookup::Replay(_) | IdempotencyLookup::Reused => None,
            },
            None => state
                .refusal(&job.command)
                .map(|rejection| (Outcome::Rejected(rejection), false)),
        };
        match answer {
            Some(answer) => {
                let _ = job.reply.send(Ok(answer));
            }
            None => kept.push(job),
        }
    }
    std::mem::swap(jobs, kept);
}

/// The records of one commit: an hourly prune first when one is due, then each job's command
/// with its idempotency claim, all at `now`.
fn batch_records(jobs: &mut [Job], now: Timestamp, prunes: bool, records: &mut Vec<Record>) {
    if prunes {
        let before = Timestamp(now.0.saturating_sub(IDEMPOTENCY_TTL_SECS * 1_000_000));
        records.push(Record {
            now,
            idempotency: None,
            command: Command::PruneIdempotencyKeys { before },
        });
    }
    for job in jobs {
        records.push(Record {
            now,
            idempotency: job.idempotency.take(),
            command: std::mem::replace(
                &mut job.command,
                Command::PruneIdempotencyKeys {
                    before: Timestamp(0),
                },
            ),
        });
    }
}

/// A batch's time: the clock's, but always later than the process's previous batch, so that
/// batches of one process never share a time and never go back in time.
fn batch_time(last: &AtomicU64, clock_now: Timestamp) -> Timestamp {
    let mut previous = last.load(Ordering::Relaxed);
    loop {
        let now = clock_now.0.max(previous.saturating_add(1));
        match last.compare_exchange_weak(previous, now, Ordering::AcqRel, Ordering::Relaxed) {
            Ok(_) => return Timestamp(now),
            Err(actual) => previous = actual,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn a_checkpoint_waits_for_queued_jobs_half_an_interval_at_most() {
        let interval = 300_000;
        // Nothing queued: due at one interval, not a row before.
        assert!(!checkpoint_due(interval - 1, interval, false));
        assert!(checkpoint_due(interval, interval, false));
        // Jobs queued: it waits past one interval, up to half an interval more, never longer.
        assert!(!checkpoint_due(interval, interval, true));
        assert!(!checkpoint_due(interval + interval / 2 - 1, interval, true));
        assert!(checkpoint_due(interval + interval / 2, interval, true));
        assert!(checkpoint_due(3 * interval, interval, true));
    }

    #[test]
    fn a_commit_waits_in_proportion_to_how_far_past_one_interval_and_to_its_payments() {
        let full = PAYMENTS_PER_BATCH_MAX;
        // A full batch: nothing at one interval, half way half of it, all of it at the bound.
        assert_eq!(pace(0, 1_000, full), Duration::ZERO);
        assert_eq!(pace(500, 1_000, full), PACE_MAX / 2);
        assert_eq!(pace(1_000, 1_000, full), PACE_MAX);
        // Past the bound, or more than a batch, waits no longer.
        assert_eq!(pace(5_000, 1_000, 4 * full), PACE_MAX);
        // A single payment waits its share of a batch's wait; none, none.
        assert_eq!(
            pace(1_000, 1_000, 1),
            PACE_MAX / u32::try_from(full).unwrap()
        );
        assert_eq!(pace(1_000, 1_000, 0), Duration::ZERO);
        // Half a batch half way waits a quarter.
        assert_eq!(
            pace(500, 1_000, full / 2),
            PACE_MAX * (full / 2) as u32 / full as u32 / 2
        );
    }
}
