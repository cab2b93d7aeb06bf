//! Farthing's use cases over the pure state and a durable journal.
//!
//! One writer thread owns every change. Requests from any number of connections queue up;
//! the writer takes all that are waiting (up to [`RECORDS_PER_COMMIT_MAX`]), appends them to
//! the journal with one `fdatasync`, then applies them to the in-memory [`State`] in order and
//! answers each. That is group commit: under load, one fsync acknowledges thousands of
//! payments.
//!
//! Because records are applied only once durable, reads (a shared lock on the state) never see
//! a payment that a crash could take back, and a write the journal refuses changes nothing.
#![forbid(unsafe_code)]

mod env;
mod secret;

use std::collections::HashMap;
use std::sync::{Arc, Mutex, RwLock, RwLockReadGuard};
use std::thread::JoinHandle;

use farthing_ledger::{Amount, Currency, Timestamp, TransferId};
use farthing_payments::*;
use farthing_store::{Journal, StoreError};
use tokio::sync::{mpsc, oneshot};

pub use env::{Clock, Ids, ManualClock, RandomIds, SequentialIds, SystemClock};
pub use secret::{Secret, fingerprint, hex};

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
}

struct Job {
    command: Command,
    idempotency: Option<IdempotencyClaim>,
    /// The outcome, and whether it is the stored answer of an earlier request with the same
    /// idempotency key.
    reply: oneshot::Sender<Result<(Outcome, bool), ServiceError>>,
}

struct Shared {
    state: RwLock<State>,
    ids: Arc<dyn Ids>,
    config: Config,
    /// API keys of recently created parties, by party id, so that a retried creation answers
    /// with the same key. Kept in memory only: keys never reach the disk.
    created_keys: Mutex<HashMap<u128, (Timestamp, Secret)>>,
    clock: Arc<dyn Clock>,
    metrics: Metrics,
}

/// Counters for `/metrics`.
#[derive(Default)]
pub struct Metrics {
    pub commits: std::sync::atomic::AtomicU64,
    pub records_committed: std::sync::atomic::AtomicU64,
    pub commit_micros_total: std::sync::atomic::AtomicU64,
}

/// A handle to the running service; cheap to clone.
#[derive(Clone)]
pub struct Service {
    shared: Arc<Shared>,
    submit: mpsc::Sender<Message>,
    writer: Arc<Mutex<Option<JoinHandle<()>>>>,
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
    /// when given (replacing an older one), else a new one when the journal has none.
    pub async fn open(
        mut journal: Box<dyn Journal>,
        config: Config,
        clock: Arc<dyn Clock>,
        ids: Arc<dyn Ids>,
        operator_key: Option<Secret>,
    ) -> Result<Opened, ServiceError> {
        let (state, records_replayed) = tokio::task::block_in_place(|| {
            let mut state = State::new();
            let count = journal.replay(&mut |record| {
                state.apply(&record);
            })?;
            Ok::<_, StoreError>((state, count))
        })?;
        let (submit, receive) = mpsc::channel(QUEUE_DEPTH_MAX);
        let shared = Arc::new(Shared {
            state: RwLock::new(state),
            ids,
            config,
            created_keys: Mutex::new(HashMap::new()),
            clock: clock.clone(),
            metrics: Metrics::default(),
        });
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
                        write_loop(shared, journal, clock, receive)
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
            writer: Arc::new(Mutex::new(Some(writer))),
        };
        let has_key = service.read_now(|state| state.has_operator_key());
        // The key to record, if any, and the one to print because it was made here.
        let (key_to_set, generated_operator_key) = match operator_key {
            Some(key) => {
                let known = service.read_now(|state| state.principal(&key.hash()))
                    == Some(Principal::Operator);
                (if known { None } else { Some(key) }, None)
            }
            None if !has_key => {
                let key = Secret::generate_api_key("op");
                (Some(key.clone()), Some(key))
            }
            None => (None, None),
        };
        if let Some(key) = key_to_set {
            let key_hash = key.hash();
            service
                .submit(Command::SetOperatorKey { key_hash }, None)
                .await?;
        }
        Ok(Opened {
            service,
            records_replayed,
            generated_operator_key,
        })
    }

    pub fn config(&self) -> &Config {
        &self.shared.config
    }

    pub fn metrics(&self) -> &Metrics {
        &self.shared.metrics
    }

    /// Reads the state as it is now, without waiting for durability. Only for facts that
    /// cannot be taken back, such as which principal owns a key.
    pub fn read_now<T>(&self, read: impl FnOnce(&State) -> T) -> T {
        read(&self.state())
    }

    /// Reads the state. Everything in it is durable: the writer applies records only after
    /// the journal has them.
    pub async fn read<T>(&self, read: impl FnOnce(&State) -> T) -> Result<T, ServiceError> {
        Ok(read(&self.state()))
    }

    fn state(&self) -> RwLockReadGuard<'_, State> {
        self.shared
            .state
            .read()
            .expect("the writer never panics holding the lock")
    }

    /// Who holds `key`.
    pub fn authenticate(&self, key: &Secret) -> Option<Principal> {
        self.read_now(|state| state.principal(&key.hash()))
    }

    pub fn next_id(&self) -> u128 {
        self.shared.ids.next_id()
    }

    fn transfer_ids(&self) -> [TransferId; 2] {
        [TransferId(self.next_id()), TransferId(self.next_id())]
    }

    /// Applies `command` durably and returns its outcome. With an idempotency claim, a
    /// completed earlier request with the same key answers instead.
    pub async fn submit(
        &self,
        command: Command,
        idempotency: Option<IdempotencyClaim>,
    ) -> Result<Executed, ServiceError> {
        if let Some(claim) = &idempotency {
            let known =
                self.read(
                    |state| match state.idempotency_lookup(&claim.key, &claim.fingerprint) {
                        IdempotencyLookup::New => None,
                        IdempotencyLookup::Replay(outcome) => Some(outcome.clone()),
                        IdempotencyLookup::Reused => {
                            Some(Outcome::Rejected(Rejection::IdempotencyKeyReused))
                        }
                    },
                );
            if let Some(outcome) = known.await? {
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
        if let Some(handle) = writer.lock().expect("writer handle lock").take() {
            let _ = handle.join();
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

/// The writer: gathers waiting jobs, appends them to the journal with one fsync, then applies
/// them and answers. Appending first means the state in memory only ever holds what is
/// durable, and a refused append (a full disk) changes nothing and is answered with
/// `StorageUnavailable`.
fn write_loop(
    shared: Arc<Shared>,
    mut journal: Box<dyn Journal>,
    clock: Arc<dyn Clock>,
    mut receive: mpsc::Receiver<Message>,
) {
    use std::sync::atomic::Ordering::Relaxed;
    let mut jobs: Vec<Job> = Vec::with_capacity(RECORDS_PER_COMMIT_MAX);
    let mut records: Vec<Record> = Vec::with_capacity(RECORDS_PER_COMMIT_MAX + 1);
    let mut outcomes: Vec<(Outcome, bool)> = Vec::with_capacity(RECORDS_PER_COMMIT_MAX);
    // Time never goes backwards in the journal, even across a restart on a clock that did.
    let mut last_now = shared.state.read().expect("state lock").last_time();
    let mut next_prune = Timestamp(0);
    while let Some(first) = receive.blocking_recv() {
        // After a stop, the queue refuses new jobs but still yields those already in it, so
        // everything accepted before the stop is committed and answered.
        match first {
            Message::Job(job) => jobs.push(job),
            Message::Stop => receive.close(),
        }
        while jobs.len() < RECORDS_PER_COMMIT_MAX {
            match receive.try_recv() {
                Ok(Message::Job(job)) => jobs.push(job),
                Ok(Message::Stop) => receive.close(),
                Err(_) => break,
            }
        }
        if jobs.is_empty() {
            continue;
        }
        let started = std::time::Instant::now();
        // Time never goes backwards in the journal, whatever the wall clock does.
        let now = clock.now().max(last_now);
        last_now = now;
        let prunes = now >= next_prune;
        if prunes {
            let before = Timestamp(now.0.saturating_sub(IDEMPOTENCY_TTL_SECS * 1_000_000));
            records.push(Record {
                now,
                idempotency: None,
                command: Command::PruneIdempotencyKeys { before },
            });
        }
        for job in &mut jobs {
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
        if let Err(error) = journal.append(&records) {
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
        {
            let mut state = shared.state.write().expect("state lock");
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
        }
        shared.metrics.commits.fetch_add(1, Relaxed);
        shared
            .metrics
            .records_committed
            .fetch_add(records.len() as u64, Relaxed);
        shared
            .metrics
            .commit_micros_total
            .fetch_add(started.elapsed().as_micros() as u64, Relaxed);
        records.clear();
        for (job, outcome) in jobs.drain(..).zip(outcomes.drain(..)) {
            let _ = job.reply.send(Ok(outcome));
        }
    }
}
