//! History rows and state entries on disk, in fjall, written by checkpoints.
//!
//! Two keyspaces in one fjall database:
//!
//! - `history`: rows written once and never changed (payments, statement lines), read by keys
//!   that exist. It is opened with `expect_point_read_hits`, so ingestion builds no bloom
//!   filter for it; time-ordered keys make each checkpoint's rows a run that never overlaps
//!   the ones before, which fjall moves down its levels without rewriting (measured in a
//!   prototype on 2 vCPUs: about 1.7 M rows/s ingested on one thread, and no compaction).
//! - `state`: entries that change (accounts, keys), and the journal position the entries
//!   reflect, under [`POSITION_KEY`].
//!
//! Everything is written with fjall's bulk ingestion: sorted keys go straight into new table
//! files, which are synced, and one `finish()` switches the keyspace to a new version that
//! holds them, atomically and durably. fjall's own journal and memtables are never used, so
//! reopening replays nothing. A checkpoint is two ingestions: the history rows, then the state
//! changes together with the position, so that the state and its position change as one.
//!
//! A crash between the two leaves history rows of records after [`Engine::position`]. Recovery
//! replays those records from the journal and the next checkpoint ingests the same rows again
//! (the newest ingestion of a key wins). Until then they must read as absent: a replayed record
//! would otherwise find its own row and take it for a collision. So the engine stamps each
//! history row with the position of the checkpoint that wrote it (8 bytes before the value)
//! and reads a row stamped beyond its position as absent. For the same reason, what changes
//! after a row is written belongs in the state, never in the history.
//!
//! **Memory.** What the engine holds is bounded by:
//! - the block cache, `cache_bytes`, shared by both keyspaces: data, index and filter blocks
//!   read by lookups and scans;
//! - index blocks that fjall pins outside the cache for tables at its two top levels (and
//!   filter blocks at the top one) when it opens them at startup or writes them by
//!   compaction; tables just ingested are not pinned, and time-ordered history tables move
//!   to the bottom level, so this stays about the indexes of the few newest `state` tables;
//! - a small record of every table file (the history gets one or more per checkpoint), and
//!   up to 900 cached file descriptors;
//! - while ingesting: one data block, the index of the table being written (one entry per
//!   4 KiB block) and, for `state` only, 8 bytes of bloom hash per key;
//! - no memtables: ingestion bypasses them, and nothing else writes.
//!
//! [`Engine::checkpoint_in_order`] takes the history rows and the state changes one at a time,
//! each in key order: a checkpoint needs its own size once, not twice (the store encodes
//! history rows as they are reached and gathers state changes in one buffer,
//! `farthing_payments::disk::StateChanges`). Measured with 2 M history rows of 166 bytes written in
//! 40 checkpoints, 800 k state changes and a 16 MiB cache (debug build): the cache filled to
//! its capacity and no further, the whole test process stayed under 33 MiB resident, and
//! reopening with a first read took 14 ms.
//!
//! **What the caller must know.**
//! - Each checkpoint's history is a table file of its own (up to 64 MiB, then several), and
//!   time-ordered tables are moved down the levels, never merged: the history has as many
//!   tables as there were checkpoints. Checkpoint by size (hundreds of thousands of rows),
//!   not every few records.
//! - Readers never wait for a checkpoint. A checkpoint waits for the one before it. fjall's
//!   `finish()` holds fjall's journal lock, which only its own write path takes, and the
//!   engine never uses that path.
//! - A read sees the newest finished ingestion, key by key: reads of several keys racing a
//!   checkpoint may see some keys before it and some after.
//! - fjall runs one worker thread of its own ([`COMPACTION_THREADS`]) that compacts `state`,
//!   whose every checkpoint overlaps the last.
//! - fjall's journal file (`0.jnl`) is created as 64 MiB of zeros (a sparse file: no blocks
//!   on disk) and cut to what it holds at the next open.
//!
//! ```no_run
//! use farthing_store_embedded::Engine;
//! let engine = Engine::open("./farthing-data/engine".as_ref(), 64 << 20)?;
//! let history = vec![(b"p\x00\x01".to_vec(), b"a payment".to_vec())];
//! let state = vec![(b"a\x00\x07".to_vec(), Some(b"a balance".to_vec()))];
//! engine.checkpoint(history, state, 42)?;
//! assert_eq!(engine.position(), 42);
//! # Ok::<(), farthing_store::StoreError>(())
//! ```

use std::path::Path;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

use fjall::{Database, Keyspace, KeyspaceCreateOptions};

use farthing_store::StoreError;

/// The `state` key that holds the engine's journal position (8 bytes, big-endian). No key of
/// the caller's starts with its byte, so it sorts after all of them.
pub const POSITION_KEY: &[u8] = &[RESERVED_FIRST_BYTE];
const RESERVED_FIRST_BYTE: u8 = 0xFF;
/// fjall's largest key.
pub const KEY_BYTES_MAX: usize = u16::MAX as usize;
const HISTORY_KEYSPACE: &str = "history";
const STATE_KEYSPACE: &str = "state";
/// fjall's worker threads. Nothing here flushes (ingestion bypasses the memtables), so they
/// only compact `state`, one table run at a time. With two or more, fjall's first worker
/// hands every compaction request on to the others and takes the next one at once: while
/// another worker compacts, it spins on the queue, which took a sixth of all CPU time in the
/// soak on 2 cores. One worker waits on the queue instead.
const COMPACTION_THREADS: usize = 1;
/// Tables `state` gathers at its top level before merging them into the one below (fjall's
/// default is 4). Each checkpoint's state changes are spread over every payer, so a merge
/// rewrites most of the level below whatever it brings; merging a quarter as often costs a
/// quarter of that, and a point read checks a few more bloom filters, which stay in memory.
/// fjall stores a keyspace's strategy when it makes it and reads it back on every open, so an
/// engine made before this was set keeps merging at 4: slower under load, the same answers.
const STATE_L0_TABLES: u8 = 16;

/// A state change: `Some` puts the value, `None` removes the key.
pub type StateChange = (Vec<u8>, Option<Vec<u8>>);

/// The history and state of a bounded-memory core, on disk. Reads may run on any thread while
/// a checkpoint is written; checkpoints are taken one at a time.
pub struct Engine {
    history: Keyspace,
    state: Keyspace,
    /// The position the state reflects, as last written.
    position: AtomicU64,
    /// The largest id (a history key's first 16 bytes) of any history row written.
    history_id_max: AtomicU128Lock,
    /// Held while a checkpoint is written, so that two never interleave their steps.
    checkpointing: Mutex<()>,
    /// Kept open for as long as the keyspaces, and dropped after them: it owns fjall's
    /// worker threads and the directory's lock.
    _database: Database,
}

impl Engine {
    /// Opens (or creates) the engine in `dir`, with a block cache of `cache_bytes`. `dir` is
    /// the engine's alone; fjall keeps a lock file in it.
    pub fn open(dir: &Path, cache_bytes: u64) -> Result<Engine, StoreError> {
        let database = Database::builder(dir)
            .cache_size(cache_bytes)
            .worker_threads(COMPACTION_THREADS)
            .open()
            .map_err(|error| match error {
                fjall::Error::Locked => StoreError::Locked(dir.display().to_string()),
                other => engine_error(other),
            })?;
        let history = database
            .keyspace(HISTORY_KEYSPACE, || {
                KeyspaceCreateOptions::default().expect_point_read_hits(true)
            })
            .map_err(engine_error)?;
        let state = database
            .keyspace(STATE_KEYSPACE, || {
                KeyspaceCreateOptions::default().compaction_strategy(std::sync::Arc::new(
                    fjall::compaction::Leveled::default().with_l0_threshold(STATE_L0_TABLES),
                ))
            })
            .map_err(engine_error)?;
        let position = match state.get(POSITION_KEY).map_err(engine_error)? {
            None => 0,
            Some(bytes) => {
                let bytes: [u8; 8] = bytes.as_ref().try_into().map_err(|_| {
                    StoreError::Database(format!(
                        "the engine in {} holds a position of {} bytes, not 8",
                        dir.display(),
                        bytes.len()
                    ))
                })?;
                u64::from_be_bytes(bytes)
            }
        };
        let history_id_max = match history.last_key_value() {
            None => 0,
            Some(guard) => {
                let key = guard.key().map_err(engine_error)?;
                leading_u128(&key)
            }
        };
        Ok(Engine {
            history,
            state,
            position: AtomicU64::new(position),
            history_id_max: AtomicU128Lock(Mutex::new(history_id_max)),
            checkpointing: Mutex::new(()),
            _database: database,
        })
    }

    /// The journal position the engine's state reflects: every record before it is in the
    /// state. 0 for a new engine.
    pub fn position(&self) -> u64 {
        self.position.load(Ordering::Acquire)
    }

    /// Writes one checkpoint: the `history` rows (in any order; a key given twice keeps its
    /// last value), then the `state` changes (likewise) together with `position`, so that the
    /// state and its position change atomically. Durable when it returns.
    ///
    /// On `Err` the engine is at its old position with its old state, or, if the process stops
    /// before another checkpoint, possibly at the new one with the new state: both are whole.
    /// Either way the same checkpoint may be written again.
    pub fn checkpoint(
        &self,
        mut history: Vec<(Vec<u8>, Vec<u8>)>,
        mut state: Vec<StateChange>,
        position: u64,
    ) -> Result<(), StoreError> {
        keep_last_of_each_key(&mut history);
        keep_last_of_each_key(&mut state);
        self.checkpoint_in_order(
            history,
            state
                .iter()
                .map(|(key, value)| (key.as_slice(), value.as_deref())),
            position,
        )
    }

    /// [`Engine::checkpoint`] with the history rows and the state changes each given in
    /// strictly increasing key order and taken one at a time, so that a checkpoint never
    /// holds all of its history encoded at once, nor its state twice.
    pub fn checkpoint_in_order<'a, K: AsRef<[u8]>, V: AsRef<[u8]>>(
        &self,
        history: impl IntoIterator<Item = (K, V)>,
        state: impl IntoIterator<Item = (&'a [u8], Option<&'a [u8]>)>,
        position: u64,
    ) -> Result<(), StoreError> {
        let _checkpointing = self.checkpointing.lock().expect("checkpoint lock");
        let current = self.position();
        assert!(
            position >= current,
            "a checkpoint never goes back: the engine is at position {current}, the checkpoint at {position}"
        );
        self.ingest_history_in_order(history, position)?;
        self.ingest_state(state, position)
    }

    /// No history row has an id (its key's first 16 bytes) above this.
    pub fn history_id_max(&self) -> u128 {
        *self.history_id_max.0.lock().expect("id lock")
    }

    /// A checkpoint's first step alone, as a crash between its steps leaves it: for tests.
    #[cfg(test)]
    pub(crate) fn ingest_history(
        &self,
        mut rows: Vec<(Vec<u8>, Vec<u8>)>,
        position: u64,
    ) -> Result<(), StoreError> {
        keep_last_of_each_key(&mut rows);
        for (key, _) in &rows {
            assert_key_fits(key);
        }
        if rows.is_empty() {
            // Not even started: fjall creates a table file when an ingestion starts, and one
            // finished empty would be left behind until the next open.
            return Ok(());
        }
        self.ingest_history_in_order(rows, position)
    }

    /// The history step over rows in strictly increasing key order, one ingestion.
    fn ingest_history_in_order<K: AsRef<[u8]>, V: AsRef<[u8]>>(
        &self,
        rows: impl IntoIterator<Item = (K, V)>,
        position: u64,
    ) -> Result<(), StoreError> {
        let mut rows = rows.into_iter().peekable();
        if rows.peek().is_none() {
            // Not even started: an ingestion finished empty leaves a table file behind.
            return Ok(());
        }
        let mut ingestion = self.history.start_ingestion().map_err(engine_error)?;
        let mut stamped = Vec::new();
        let mut last: Vec<u8> = Vec::new();
        for (key, value) in rows {
            let key = key.as_ref();
            assert_key_fits(key);
            assert!(
                last.is_empty() || key > last.as_slice(),
                "history rows come in strictly increasing key order"
            );
            last.clear();
            last.extend_from_slice(key);
            stamped.clear();
            stamped.extend_from_slice(&position.to_be_bytes());
            stamped.extend_from_slice(value.as_ref());
            ingestion
                .write(key, stamped.as_slice())
                .map_err(engine_error)?;
        }
        // Raised before the rows can be read: an id at or below it may be on disk.
        {
            let mut max = self.history_id_max.0.lock().expect("id lock");
            *max = (*max).max(leading_u128(&last));
        }
        ingestion.finish().map_err(engine_error)
    }

    /// A history row's value, or `None` if a checkpoint beyond the engine's position wrote it.
    fn unstamp(&self, stamped: &[u8]) -> Result<Option<Vec<u8>>, StoreError> {
        let Some((stamp, value)) = stamped.split_first_chunk::<8>() else {
            return Err(StoreError::Database(
                "a history row has no checkpoint stamp".to_string(),
            ));
        };
        Ok((u64::from_be_bytes(*stamp) <= self.position()).then(|| value.to_vec()))
    }

    /// A checkpoint's second step: the state changes (in strictly increasing key order) and
    /// the position, in one ingestion, so in one version of the keyspace.
    fn ingest_state<'a>(
        &self,
        changes: impl IntoIterator<Item = (&'a [u8], Option<&'a [u8]>)>,
        position: u64,
    ) -> Result<(), StoreError> {
        let mut ingestion = self.state.start_ingestion().map_err(engine_error)?;
        let mut last: &[u8] = &[];
        for (key, change) in changes {
            assert_key_fits(key);
            assert!(
                key[0] != RESERVED_FIRST_BYTE,
                "state keys never start with 0xFF, the engine's own"
            );
            assert!(
                last.is_empty() || key > last,
                "state changes come in strictly increasing key order"
            );
            last = key;
            match change {
                Some(value) => ingestion.write(key, value),
                // A tombstone hides every older value of the key, in every older table.
                None => ingestion.write_tombstone(key),
            }
            .map_err(engine_error)?;
        }
        // Last: it sorts after every key of the caller's.
        ingestion
            .write(POSITION_KEY, position.to_be_bytes())
            .map_err(engine_error)?;
        ingestion.finish().map_err(engine_error)?;
        self.position.store(position, Ordering::Release);
        Ok(())
    }

    /// Copies the engine into a new engine in `target` (which must not hold one), as it is at
    /// one position, while readers go on; returns the position. No checkpoint is written
    /// while `during` runs after the copy, so the journal from that position on is still
    /// there for it to copy: a whole, consistent copy of a running store.
    pub fn copy_to<T>(
        &self,
        target: &Path,
        during: impl FnOnce(u64) -> Result<T, StoreError>,
    ) -> Result<(u64, T), StoreError> {
        let _checkpointing = self.checkpointing.lock().expect("checkpoint lock");
        let position = self.position();
        {
            let copy = Engine::open(target, 8 << 20)?;
            if copy.position() != 0 || copy.history.first_key_value().is_some() {
                return Err(StoreError::Io(std::io::Error::new(
                    std::io::ErrorKind::AlreadyExists,
                    format!("{} already holds an engine", target.display()),
                )));
            }
            // Keys come out of a keyspace in order, as an ingestion takes them; a row of a
            // checkpoint cut short is left out.
            if self.history.first_key_value().is_some() {
                let mut ingestion = copy.history.start_ingestion().map_err(engine_error)?;
                for guard in self.history.iter() {
                    let (key, stamped) = guard.into_inner().map_err(engine_error)?;
                    if self.unstamp(&stamped)?.is_some() {
                        ingestion.write(key, stamped).map_err(engine_error)?;
                    }
                }
                ingestion.finish().map_err(engine_error)?;
            }
            let mut ingestion = copy.state.start_ingestion().map_err(engine_error)?;
            for guard in self.state.iter() {
                let (key, value) = guard.into_inner().map_err(engine_error)?;
                ingestion.write(key, value).map_err(engine_error)?;
            }
            ingestion.finish().map_err(engine_error)?;
        }
        let done = during(position)?;
        Ok((position, done))
    }

    /// The history row with this key, if a finished checkpoint wrote it.
    pub fn history(&self, key: &[u8]) -> Result<Option<Vec<u8>>, StoreError> {
        match self.history.get(key).map_err(engine_error)? {
            Some(stamped) => self.unstamp(&stamped),
            None => Ok(None),
        }
    }

    /// The state entry with this key.
    pub fn state(&self, key: &[u8]) -> Result<Option<Vec<u8>>, StoreError> {
        assert!(
            key.first() != Some(&RESERVED_FIRST_BYTE),
            "state keys never start with 0xFF, the engine's own"
        );
        let value = self.state.get(key).map_err(engine_error)?;
        Ok(value.map(|value| value.to_vec()))
    }

    /// Every history row whose key starts with `prefix` that a finished checkpoint wrote, in
    /// key order, read lazily (for exports and tests).
    pub fn history_prefix(
        &self,
        prefix: &[u8],
    ) -> impl Iterator<Item = Result<(Vec<u8>, Vec<u8>), StoreError>> + use<'_> {
        self.history.prefix(prefix).filter_map(|guard| {
            let row = guard
                .into_inner()
                .map_err(engine_error)
                .and_then(|(key, stamped)| {
                    Ok(self.unstamp(&stamped)?.map(|value| (key.to_vec(), value)))
                });
            row.transpose()
        })
    }

    /// Every state entry whose key starts with `prefix`, in key order, read lazily; never the
    /// engine's position.
    pub fn state_prefix(
        &self,
        prefix: &[u8],
    ) -> impl Iterator<Item = Result<(Vec<u8>, Vec<u8>), StoreError>> + use<> {
        assert!(
            prefix.first() != Some(&RESERVED_FIRST_BYTE),
            "state keys never start with 0xFF, the engine's own"
        );
        self.state
            .prefix(prefix)
            .map(|guard| {
                let (key, value) = guard.into_inner().map_err(engine_error)?;
                Ok((key.to_vec(), value.to_vec()))
            })
            .filter(
                |entry| !matches!(entry, Ok((key, _)) if key.first() == Some(&RESERVED_FIRST_BYTE)),
            )
    }
}

/// Sorts `rows` by key and keeps, of each key given more than once, the last one given:
/// ingestion takes strictly increasing keys.
fn keep_last_of_each_key<V>(rows: &mut Vec<(Vec<u8>, V)>) {
    // Sorted by key, each key's last value first among its equals, so that `dedup` keeps it.
    // The sort compares each key's first 16 bytes as one integer held beside its place, and
    // reads the keys themselves only on a tie: a checkpoint's few hundred thousand keys, each
    // behind a pointer, took a sixth of its time to sort by comparing them directly.
    let mut order: Vec<(u128, usize)> = rows
        .iter()
        .enumerate()
        .map(|(at, (key, _))| (leading_u128(key), at))
        .collect();
    order.sort_unstable_by(|a, b| {
        a.0.cmp(&b.0)
            .then_with(|| rows[a.1].0.cmp(&rows[b.1].0))
            .then(b.1.cmp(&a.1))
    });
    let mut taken: Vec<Option<(Vec<u8>, V)>> = rows.drain(..).map(Some).collect();
    rows.extend(
        order
            .into_iter()
            .map(|(_, at)| taken[at].take().expect("each place once")),
    );
    rows.dedup_by(|later, kept| later.0 == kept.0);
}

/// A key's first 16 bytes as one big-endian integer, shorter keys padded with zeros: a history
/// key's id, and an integer that orders keys as their bytes do, but for ties.
fn leading_u128(key: &[u8]) -> u128 {
    let mut id = [0u8; 16];
    let n = key.len().min(16);
    id[..n].copy_from_slice(&key[..n]);
    u128::from_be_bytes(id)
}

/// A `u128` behind a lock (the standard library has no atomic of that width).
struct AtomicU128Lock(Mutex<u128>);

fn assert_key_fits(key: &[u8]) {
    assert!(
        !key.is_empty() && key.len() <= KEY_BYTES_MAX,
        "an engine key has 1 to {KEY_BYTES_MAX} bytes, not {}",
        key.len()
    );
}

fn engine_error(error: fjall::Error) -> StoreError {
    match error {
        fjall::Error::Io(error) | fjall::Error::Storage(fjall::LsmError::Io(error)) => {
            StoreError::Io(error)
        }
        other => StoreError::Database(format!("the history and state engine failed: {other}")),
    }
}

#[cfg(test)]
mod tests;
