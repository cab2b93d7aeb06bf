//! The embedded store with bounded memory: the segmented journal in front, the engine behind
//! it. Checkpoints write the state's changes into the engine; the journal before a written
//! checkpoint is removed; a cache over the engine answers what memory no longer holds.

use std::path::Path;
use std::sync::Arc;

use farthing_ledger::Currency;
use farthing_payments::disk::{self, Disk, DiskError, PayerState, StateChanges};
use farthing_payments::{AccountRow, Checkpoint, Record, State};
use farthing_store::{Checkpoints, Journal, StoreError};

use crate::{Engine, SegmentedJournal};

/// The engine's directory inside the data directory.
pub const ENGINE_DIR: &str = "engine";

impl Disk for Engine {
    fn history(&self, key: &[u8]) -> Result<Option<Vec<u8>>, DiskError> {
        Engine::history(self, key).map_err(|error| DiskError(error.to_string()))
    }

    fn state(&self, key: &[u8]) -> Result<Option<Vec<u8>>, DiskError> {
        Engine::state(self, key).map_err(|error| DiskError(error.to_string()))
    }

    fn history_id_max(&self) -> u128 {
        Engine::history_id_max(self)
    }

    fn scan_state(&self, prefix: &[u8]) -> disk::Rows<'_> {
        Box::new(
            self.state_prefix(prefix)
                .map(|row| row.map_err(|error| DiskError(error.to_string()))),
        )
    }
}

impl disk::DiskScan for Engine {
    fn scan_history(&self) -> disk::Rows<'_> {
        Box::new(
            self.history_prefix(&[])
                .map(|row| row.map_err(|error| DiskError(error.to_string()))),
        )
    }
}

/// [`Checkpoints`] into an [`Engine`].
pub struct EngineCheckpoints {
    engine: Arc<Engine>,
    /// The buffer the last checkpoint gathered its state changes in, kept for the next: a
    /// checkpoint's worth of memory made anew each time costs a page fault every 4 KiB, and
    /// resident memory that rises and falls by that much with each checkpoint.
    state: std::sync::Mutex<StateChanges>,
}

impl EngineCheckpoints {
    pub fn new(engine: Arc<Engine>) -> EngineCheckpoints {
        EngineCheckpoints {
            engine,
            state: std::sync::Mutex::new(StateChanges::default()),
        }
    }

    pub fn engine(&self) -> &Arc<Engine> {
        &self.engine
    }
}

impl Checkpoints for EngineCheckpoints {
    fn disk(&self) -> Arc<dyn Disk> {
        self.engine.clone()
    }

    fn write(&self, checkpoint: &Checkpoint) -> Result<(), StoreError> {
        // Pruned idempotency keys go first: a key pruned and made again since is among the
        // changes after them, and the last change of a key wins.
        let mut state = self.state.lock().expect("state changes");
        state.clear();
        if let Some(before) = checkpoint.prune_before {
            for entry in self.engine.state_prefix(disk::IDEMPOTENCY_BY_TIME_PREFIX) {
                let (key, _) = entry?;
                let Some(removed) = disk::pruned_by(&key, before) else {
                    break;
                };
                for key in removed {
                    state.remove(&key);
                }
            }
        }
        checkpoint.state_changes(&mut state);
        self.engine.checkpoint_in_order(
            checkpoint.history_in_key_order(),
            state.in_key_order(),
            checkpoint.position,
        )
    }
}

/// Opens the bounded store in `data_dir`: the segmented journal (adopting a single-file
/// journal) and the engine, with a block cache of `engine_cache_bytes`.
pub fn open(
    data_dir: &Path,
    engine_cache_bytes: u64,
) -> Result<(SegmentedJournal, EngineCheckpoints), StoreError> {
    open_with(data_dir, engine_cache_bytes, crate::SEGMENT_BYTES_MAX)
}

/// [`open`] with journal segments of `segment_bytes_max`.
pub fn open_with(
    data_dir: &Path,
    engine_cache_bytes: u64,
    segment_bytes_max: u64,
) -> Result<(SegmentedJournal, EngineCheckpoints), StoreError> {
    // The journal first: it takes the data directory's lock.
    let journal = SegmentedJournal::open_with(data_dir, segment_bytes_max)?;
    let engine = Engine::open(&data_dir.join(ENGINE_DIR), engine_cache_bytes)?;
    upgrade(&engine)?;
    Ok((journal, EngineCheckpoints::new(Arc::new(engine))))
}

/// Brings a state written in an earlier format up to this build's, in one state change at the
/// engine's own position: a crash before it is durable leaves the old format whole, to be
/// upgraded at the next open.
fn upgrade(engine: &Engine) -> Result<(), StoreError> {
    let mut changes = StateChanges::default();
    if disk::upgrade_state(engine, &mut changes)? {
        engine.checkpoint_in_order(
            std::iter::empty::<(&[u8], &[u8])>(),
            changes.in_key_order(),
            engine.position(),
        )?;
    }
    Ok(())
}

/// [`open_with`] as a server opens it: journal segments are made ahead of time, so that
/// appends overwrite blocks already on disk (`Segments::with_spares`).
pub fn open_serving(
    data_dir: &Path,
    engine_cache_bytes: u64,
    segment_bytes_max: u64,
) -> Result<(SegmentedJournal, EngineCheckpoints), StoreError> {
    let (journal, checkpoints) = open_with(data_dir, engine_cache_bytes, segment_bytes_max)?;
    Ok((journal.with_spares(), checkpoints))
}

/// What [`verify`] found.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Verified {
    /// The position after the last record: records the store has ever applied.
    pub end_position: u64,
    pub merchants: usize,
    pub payers: usize,
    pub payments: usize,
    /// Currencies whose accounts do not sum to zero (empty when money is conserved).
    pub unbalanced: Vec<Currency>,
}

/// Opens the bounded store in `data_dir` as a server would (not while one runs on it), replays
/// its journal after the engine's position, writes a checkpoint of it all, and sums every
/// account by currency: a store that opens, replays and balances.
pub fn verify(data_dir: &Path) -> Result<Verified, StoreError> {
    let (mut journal, checkpoints) = open(data_dir, 8 << 20)?;
    let mut state = State::cache_over(checkpoints.disk())?;
    let from = state.records_applied();
    let mut failed: Option<DiskError> = None;
    let replayed = journal.replay_from(from, &mut |record: Record| {
        if failed.is_none() {
            match state.load_for(std::slice::from_ref(&record)) {
                Ok(()) => {
                    state.apply(&record);
                }
                Err(error) => failed = Some(error),
            }
        }
    })?;
    if let Some(error) = failed {
        return Err(error.into());
    }
    let checkpoint = state.freeze();
    checkpoints.write(&checkpoint)?;
    state.checkpoint_written(checkpoint.position);
    let mut totals: std::collections::BTreeMap<Currency, (i128, i128)> = Default::default();
    let mut add = |account: &farthing_ledger::Account| {
        let sums = totals.entry(account.currency).or_default();
        sums.0 += account.posted_balance();
        sums.1 += i128::from(account.credits_pending) - i128::from(account.debits_pending);
    };
    // Payers' accounts are in their rows; every other account in a row of its own.
    for entry in checkpoints
        .engine()
        .state_prefix(&[disk::state_kind::PAYER])
    {
        let row: PayerState = disk::decode(&entry?.1)?;
        row.accounts.iter().for_each(&mut add);
    }
    for entry in checkpoints
        .engine()
        .state_prefix(&[disk::state_kind::ACCOUNT])
    {
        let row: AccountRow = disk::decode(&entry?.1)?;
        add(&row.account);
    }
    Ok(Verified {
        end_position: from + replayed,
        merchants: state.merchant_count(),
        payers: state.payer_count(),
        payments: state.payment_count(),
        unbalanced: totals
            .into_iter()
            .filter(|(_, (posted, pending))| *posted != 0 || *pending != 0)
            .map(|(currency, _)| currency)
            .collect(),
    })
}

#[cfg(test)]
mod tests;
