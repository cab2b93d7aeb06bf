//! [`Forecast`]: the accounts as this process expects to find them, so that a batch can be
//! worked out, and its new rows written, before it takes its accounts' locks.

use std::sync::Mutex;
use std::sync::atomic::{AtomicU32, Ordering};

use farthing_ledger::AccountId;

use super::*;

/// An account as a batch read it: its totals and the time it last changed.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub(crate) struct Known {
    pub(crate) account: Account,
    pub(crate) changed_at: Timestamp,
}

/// Accounts by owner and currency.
pub(crate) type Accounts = HashMap<(Owner, Currency), Known>;

/// What one process expects its accounts to hold: each as the last batch this process
/// committed or worked out left it. A batch first learns the accounts the forecast does not
/// know, as they stand committed (read without locking them), then is worked out from these
/// figures, writes its new rows, and only then takes its accounts and checks that they hold
/// exactly what it assumed (see `take_foreseen_accounts`). If any does not (another process
/// changed it, or a batch it followed failed), the batch is rolled back and applied again the
/// usual way, from accounts locked and read first.
///
/// So two batches of one process overlap: the second writes its payments while the first still
/// holds the accounts they share, and takes those locks the moment the first commits. Nothing
/// is trusted without the check under lock, so a wrong forecast costs time, never correctness.
/// After a wrong forecast the next batches lock first: [`COOL_DOWN`] of them, doubling with
/// each wrong forecast up to [`COOL_DOWN_MAX`] and halving again with each right one, so that
/// accounts several processes keep changing do not waste work on guesses that keep failing.
pub struct Forecast {
    accounts: Mutex<Figures>,
    /// Merchants and payers read from the database. They never change once made, so a batch
    /// takes those it names from here instead of reading them again. A capability that makes
    /// one of their facts changeable (a fee, a frozen wallet) must take it out of here, or
    /// check it under lock as the accounts' figures are checked: a process keeps only what
    /// can never change, or checks what it assumed.
    parties: Mutex<Parties>,
    /// Batches left to lock first.
    cool_down: AtomicU32,
    /// How many batches lock first after the next wrong forecast.
    penalty: AtomicU32,
    /// What the batches applied with this forecast did.
    pub(crate) counts: Counts,
    capacity: usize,
    /// The ticket of the batch whose turn it is to lock its accounts: batches worked out from
    /// the forecast lock in the order they were worked out in, each once the one before holds
    /// its locks. (One that locked first would find its accounts without the changes it
    /// assumed, and be worked out again.)
    turn: tokio::sync::watch::Sender<u64>,
    /// The `payment_lines` row: written once by the migration that made it, never changed,
    /// so read once.
    pub(super) payment_lines: std::sync::OnceLock<Timestamp>,
}

/// Counts of the batches applied with a forecast.
#[derive(Default, Debug)]
pub(crate) struct Counts {
    /// Committed after being worked out from the forecast.
    pub(crate) foreseen: std::sync::atomic::AtomicU64,
    /// Committed after locking and reading their accounts first.
    pub(crate) locked_first: std::sync::atomic::AtomicU64,
    /// Worked out from a forecast that proved wrong under lock, and applied again.
    pub(crate) wrong: std::sync::atomic::AtomicU64,
    /// Attempts redone after a serialization failure, a deadlock or a unique violation.
    pub(crate) conflicts: std::sync::atomic::AtomicU64,
}

#[derive(Default)]
pub(super) struct Parties {
    pub(super) merchants: HashMap<MerchantId, Merchant>,
    pub(super) payers: HashMap<PayerId, Payer>,
}

struct Figures {
    accounts: Accounts,
    next_ticket: u64,
}

/// Batches that lock first after a forecast proved wrong, at the least and at the most.
pub const COOL_DOWN: u32 = 4;
pub const COOL_DOWN_MAX: u32 = 64;

/// How long a batch waits for its turn to lock at most. The batch before it may be waiting on
/// a row this one wrote (an idempotency key both claim), which PostgreSQL cannot see as a
/// deadlock; after this, the batch locks anyway.
const TURN_WAIT_MAX: std::time::Duration = std::time::Duration::from_millis(250);

/// Accounts (and, separately, merchants and payers) a forecast keeps at most by default: some
/// 30 MB of each at the most.
pub const CAPACITY: usize = 1 << 18;

impl Default for Forecast {
    fn default() -> Self {
        Forecast::with_capacity(CAPACITY)
    }
}

impl Forecast {
    /// A forecast of at most `capacity` accounts, and as many merchants and payers; when one
    /// would hold more, it starts again, empty (and learns again what batches read).
    pub fn with_capacity(capacity: usize) -> Forecast {
        Forecast {
            accounts: Mutex::new(Figures {
                accounts: HashMap::new(),
                next_ticket: 0,
            }),
            parties: Mutex::new(Parties::default()),
            cool_down: AtomicU32::new(0),
            penalty: AtomicU32::new(COOL_DOWN),
            counts: Counts::default(),
            capacity,
            turn: tokio::sync::watch::Sender::new(0),
            payment_lines: std::sync::OnceLock::new(),
        }
    }

    /// Attempts at batches applied with this forecast that were redone after a serialization
    /// failure, a deadlock or a unique violation.
    pub fn conflicts(&self) -> u64 {
        self.counts.conflicts.load(Ordering::Relaxed)
    }

    /// The accounts known now.
    pub fn len(&self) -> usize {
        self.lock().accounts.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Figures> {
        // A panic elsewhere cannot leave the map wrong, only out of date, which the check
        // under lock catches.
        self.accounts
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Whether the next batch may be worked out from the forecast (false while cooling down).
    pub(super) fn usable(&self) -> bool {
        self.cool_down
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |left| {
                left.checked_sub(1)
            })
            .is_err()
    }

    /// With the forecast held, so that batches are worked out one after another: when every
    /// account in `wanted` is known, runs `work` on their figures, records what it returns as
    /// their figures from now on, and returns its result, the figures it started from, and
    /// the batch's ticket for [`Forecast::wait_turn`].
    pub(super) fn work_out<T, E>(
        &self,
        wanted: &BTreeSet<(Owner, Currency)>,
        work: impl FnOnce(&Accounts) -> Result<(T, Accounts), E>,
    ) -> Result<Option<(T, Accounts, u64)>, E> {
        let mut figures = self.lock();
        let mut before = Accounts::with_capacity(wanted.len());
        for key in wanted {
            match figures.accounts.get(key) {
                Some(known) => {
                    before.insert(*key, *known);
                }
                None => return Ok(None),
            }
        }
        let (result, after) = work(&before)?;
        Self::insert(&mut figures.accounts, after, self.capacity);
        let ticket = figures.next_ticket;
        figures.next_ticket += 1;
        Ok(Some((result, before, ticket)))
    }

    /// Runs `read` on the merchants and payers known.
    pub(super) fn with_parties<T>(&self, read: impl FnOnce(&Parties) -> T) -> T {
        read(
            &self
                .parties
                .lock()
                .unwrap_or_else(|poisoned| poisoned.into_inner()),
        )
    }

    /// Records merchants and payers read from the database.
    pub(super) fn learn_parties(&self, merchants: &[Merchant], payers: &[Payer]) {
        if merchants.is_empty() && payers.is_empty() {
            return;
        }
        let mut parties = self
            .parties
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        if parties.merchants.len() + parties.payers.len() + merchants.len() + payers.len()
            > self.capacity
        {
            *parties = Parties::default();
        }
        for merchant in merchants {
            parties.merchants.insert(merchant.id, merchant.clone());
        }
        for payer in payers {
            parties.payers.insert(payer.id, payer.clone());
        }
    }

    /// The accounts of `wanted` it does not know.
    pub(super) fn unknown(
        &self,
        wanted: &BTreeSet<(Owner, Currency)>,
    ) -> BTreeSet<(Owner, Currency)> {
        let figures = self.lock();
        wanted
            .iter()
            .filter(|key| !figures.accounts.contains_key(key))
            .copied()
            .collect()
    }

    /// Records committed figures of accounts it did not know. (Every account a batch in
    /// flight works on is known, so the committed figures of one that is not are the latest
    /// this process knows of; one learnt since from a batch is kept.)
    pub(super) fn learn_unknown(&self, committed: Accounts) {
        let mut figures = self.lock();
        if figures.accounts.len() + committed.len() > self.capacity {
            figures.accounts.clear();
        }
        for (key, known) in committed {
            figures.accounts.entry(key).or_insert(known);
        }
    }

    /// Waits until every batch worked out so far holds its accounts' locks (or gave up), or
    /// [`TURN_WAIT_MAX`].
    pub(super) async fn wait_queue(&self) {
        let ticket = self.lock().next_ticket;
        self.wait_turn(ticket).await;
    }

    /// Waits until the batches worked out before the one with `ticket` hold their accounts'
    /// locks (or gave up), or [`TURN_WAIT_MAX`].
    pub(super) async fn wait_turn(&self, ticket: u64) {
        let mut turn = self.turn.subscribe();
        let _ = tokio::time::timeout(TURN_WAIT_MAX, turn.wait_for(|turn| *turn >= ticket)).await;
    }

    /// The batch with `ticket` holds its locks, or will not take them: the next may lock.
    pub(super) fn pass_turn(&self, ticket: u64) {
        self.turn.send_if_modified(|turn| {
            let passed = *turn <= ticket;
            if passed {
                *turn = ticket + 1;
            }
            passed
        });
    }

    /// A batch worked out from the forecast committed: the cool-down after the next wrong
    /// forecast halves.
    pub(super) fn confirmed(&self) {
        let _ = self
            .penalty
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |penalty| {
                Some((penalty / 2).max(COOL_DOWN))
            });
    }

    /// Records the figures a batch holding its accounts' locks leaves them with.
    pub(super) fn learn(&self, after: Accounts) {
        let mut figures = self.lock();
        Self::insert(&mut figures.accounts, after, self.capacity);
    }

    /// Forgets these accounts (their figures are in doubt) and cools down.
    pub(super) fn forget<'k>(&self, keys: impl IntoIterator<Item = &'k (Owner, Currency)>) {
        let mut figures = self.lock();
        for key in keys {
            figures.accounts.remove(key);
        }
        let penalty = self
            .penalty
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |penalty| {
                Some((penalty * 2).min(COOL_DOWN_MAX))
            })
            .unwrap_or(COOL_DOWN);
        self.cool_down.store(penalty, Ordering::Relaxed);
    }

    fn insert(accounts: &mut Accounts, figures: Accounts, capacity: usize) {
        if accounts.len() + figures.len() > capacity {
            accounts.clear();
        }
        accounts.extend(figures);
    }
}

/// The figures of `wanted` accounts after a batch: each as `working` holds it now, changed at
/// `now` if the batch wrote it and as `before` says otherwise.
pub(super) fn figures_after(
    working: &State,
    wanted: &BTreeSet<(Owner, Currency)>,
    before: &Accounts,
    changes: &Changes,
    now: Timestamp,
) -> Accounts {
    let written: BTreeSet<AccountId> = changes
        .account_totals
        .iter()
        .map(|account| account.id)
        .chain(
            changes
                .accounts_created
                .iter()
                .map(|(_, account)| account.id),
        )
        .collect();
    wanted
        .iter()
        .filter_map(|&(owner, currency)| {
            let account = working.account_of(owner, currency)?;
            let changed_at = if written.contains(&account.id) {
                now
            } else {
                before.get(&(owner, currency))?.changed_at
            };
            Some((
                (owner, currency),
                Known {
                    account,
                    changed_at,
                },
            ))
        })
        .collect()
}

/// The figures of locked account rows.
pub(super) fn figures_of(rows: &[(Owner, Account, Timestamp)]) -> Accounts {
    rows.iter()
        .map(|&(owner, account, changed_at)| {
            (
                (owner, account.currency),
                Known {
                    account,
                    changed_at,
                },
            )
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// How many batches lock first before the forecast is used again.
    fn locking_first(forecast: &Forecast) -> u32 {
        let mut batches = 0;
        while !forecast.usable() {
            batches += 1;
            assert!(batches <= COOL_DOWN_MAX, "the cool-down never ends");
        }
        batches
    }

    #[test]
    fn the_cool_down_grows_while_forecasts_prove_wrong_and_shrinks_while_they_hold() {
        let forecast = Forecast::default();
        let nothing: [(Owner, Currency); 0] = [];
        assert_eq!(locking_first(&forecast), 0);
        let mut expected = COOL_DOWN;
        for _ in 0..6 {
            forecast.forget(&nothing);
            assert_eq!(locking_first(&forecast), expected);
            expected = (expected * 2).min(COOL_DOWN_MAX);
        }
        assert_eq!(expected, COOL_DOWN_MAX);
        forecast.forget(&nothing);
        assert_eq!(locking_first(&forecast), COOL_DOWN_MAX, "capped");
        // Each batch that committed from the forecast halves the next cool-down.
        forecast.confirmed();
        forecast.confirmed();
        forecast.forget(&nothing);
        assert_eq!(locking_first(&forecast), COOL_DOWN_MAX / 4);
        for _ in 0..10 {
            forecast.confirmed();
        }
        forecast.forget(&nothing);
        assert_eq!(locking_first(&forecast), COOL_DOWN, "never below the least");
    }

    #[test]
    fn committed_reads_never_replace_what_a_batch_left_and_a_full_forecast_starts_again() {
        let forecast = Forecast::with_capacity(2);
        let usd = Currency::parse("USD").unwrap();
        let figures = |n: u128, credits: u64| {
            let owner = Owner::Payer(PayerId::from_u128(n));
            let account = Account {
                id: account_id(owner, usd),
                kind: farthing_ledger::AccountKind::PayerWallet,
                currency: usd,
                debits_posted: 0,
                credits_posted: credits,
                debits_pending: 0,
                credits_pending: 0,
            };
            let known = Known {
                account,
                changed_at: Timestamp(1),
            };
            Accounts::from([((owner, usd), known)])
        };
        let wanted = |n: u128| BTreeSet::from([(Owner::Payer(PayerId::from_u128(n)), usd)]);
        forecast.learn(figures(1, 50));
        // Read as committed while a batch's figures for it are known: the batch's stay.
        forecast.learn_unknown(figures(1, 10));
        let worked = forecast
            .work_out(&wanted(1), |before| {
                Ok::<_, ()>((before.clone(), Accounts::new()))
            })
            .unwrap()
            .expect("known");
        assert_eq!(worked.1, figures(1, 50));
        assert!(forecast.unknown(&wanted(2)) == wanted(2));
        forecast.learn_unknown(figures(2, 20));
        assert_eq!(forecast.len(), 2);
        // A third account does not fit: the forecast starts again with it alone.
        forecast.learn(figures(3, 30));
        assert_eq!(forecast.len(), 1);
        assert!(forecast.unknown(&wanted(1)) == wanted(1));
        assert!(forecast.unknown(&wanted(3)).is_empty());
    }
}
