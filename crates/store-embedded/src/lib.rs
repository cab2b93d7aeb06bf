//! The embedded default store: one append-only journal file in the data directory.
//!
//! File layout: an 8-byte magic, then frames. A frame is
//! `[payload length: u32 LE][CRC-32 of length and payload: u32 LE][payload]`, and a payload is
//! one record in [`farthing_payments::codec`] form. One [`Journal::append`] is one `write` and
//! one `fdatasync`, however many records it carries: that is group commit.
//!
//! Recovery reads frames until the first one that is short or fails its checksum. Only the
//! tail can be damaged by a crash (the append that was never acknowledged), so the file is cut
//! there, made durable, and appends continue.
//!
//! Two durable parts for a core whose memory is bounded, not yet used by the server:
//! [`segments`], the same frames in a series of files that can be trimmed from the front once
//! a checkpoint holds their records, and [`engine`], history rows and state entries in fjall,
//! written by checkpoints together with the journal position they reflect.
//!
//! ```no_run
//! use farthing_store::Journal;
//! let mut journal = farthing_store_embedded::FileJournal::open("./farthing-data".as_ref())?;
//! let count = journal.replay(&mut |record| { let _ = record; })?;
//! # Ok::<(), farthing_store::StoreError>(())
//! ```
#![forbid(unsafe_code)]

use std::fs::{File, OpenOptions, TryLockError};
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use farthing_payments::{Record, codec};
use farthing_store::{Journal, StoreError};

pub mod backup;
pub mod cached;
pub mod engine;
mod frame;
pub mod segments;
mod test_clock;

pub use cached::{ENGINE_DIR, EngineCheckpoints};
pub use engine::Engine;
pub use frame::RECORD_BYTES_MAX;
pub use segments::{SEGMENT_BYTES_MAX, SEGMENTS_DIR, SegmentedJournal, Segments};
pub use test_clock::FileTestClock;

use frame::MAGIC;

/// The journal's file name inside the data directory.
pub const JOURNAL_FILE: &str = "journal.farthing";
const LOCK_FILE: &str = "LOCK";

/// Takes the data directory's lock, which is held for as long as the returned file is open:
/// one process, and one journal, per data directory.
fn lock_data_dir(dir: &Path) -> Result<File, StoreError> {
    std::fs::create_dir_all(dir)?;
    let lock = OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(dir.join(LOCK_FILE))?;
    match lock.try_lock() {
        Ok(()) => Ok(lock),
        Err(TryLockError::WouldBlock) => Err(StoreError::Locked(dir.display().to_string())),
        Err(TryLockError::Error(error)) => Err(error.into()),
    }
}

/// Makes a directory's entries (files created, renamed or removed in it) durable.
fn sync_dir(dir: &Path) -> std::io::Result<()> {
    File::open(dir)?.sync_all()
}

/// Whether a payload is a record this build reads: the single file's test of a frame found
/// after damage, stricter than a checksum alone.
fn is_record(payload: &[u8]) -> bool {
    codec::decode(payload).is_ok()
}

pub struct FileJournal {
    file: File,
    path: PathBuf,
    /// Bytes of the file that hold whole, verified frames.
    len: u64,
    replayed: bool,
    buffer: Vec<u8>,
    /// Held for the journal's lifetime: one process per data directory.
    _lock: File,
}

impl FileJournal {
    /// Opens (or creates) the journal in `dir`, taking the directory's lock.
    pub fn open(dir: &Path) -> Result<FileJournal, StoreError> {
        let lock = lock_data_dir(dir)?;
        if segments::holds_segments(dir)? {
            // The single file was moved into the segments when they were first opened: a new,
            // empty file here would serve an empty state in place of the real one.
            return Err(StoreError::Io(std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                format!(
                    "{} holds a segmented journal ({SEGMENTS_DIR}/), which the single-file \
                     journal cannot read",
                    dir.display()
                ),
            )));
        }
        let path = dir.join(JOURNAL_FILE);
        let created = !path.exists();
        let mut file = OpenOptions::new()
            .create(true)
            .truncate(false)
            .read(true)
            .write(true)
            .open(&path)?;
        if created || file.metadata()?.len() == 0 {
            file.write_all(MAGIC)?;
            file.sync_all()?;
            // The new file's directory entry must be durable too.
            sync_dir(dir)?;
        }
        Ok(FileJournal {
            file,
            path,
            len: MAGIC.len() as u64,
            replayed: false,
            buffer: Vec::with_capacity(1 << 20),
            _lock: lock,
        })
    }

    /// Bytes of verified journal.
    pub fn len_bytes(&self) -> u64 {
        self.len
    }
}

impl Journal for FileJournal {
    fn append(&mut self, records: &[Record]) -> Result<(), StoreError> {
        assert!(self.replayed, "replay the journal before appending to it");
        self.buffer.clear();
        for record in records {
            frame::push_frame(&mut self.buffer, |out| codec::encode(record, out));
        }
        frame::append_durably(&mut self.file, self.len, &self.buffer)?;
        self.len += self.buffer.len() as u64;
        if self.buffer.capacity() > 16 << 20 {
            self.buffer = Vec::with_capacity(1 << 20);
        }
        Ok(())
    }

    fn replay(&mut self, visit: &mut dyn FnMut(Record)) -> Result<u64, StoreError> {
        let mut bytes = Vec::new();
        self.file.seek(SeekFrom::Start(0))?;
        self.file.read_to_end(&mut bytes)?;
        let (end, count) = scan(&bytes, &self.path, visit)?;
        if end < bytes.len() {
            tracing::warn!(
                discarded_bytes = bytes.len() - end,
                "cutting an unfinished append from the end of the journal"
            );
            self.file.set_len(end as u64)?;
            self.file.sync_all()?;
        }
        self.file.seek(SeekFrom::Start(end as u64))?;
        self.len = end as u64;
        self.replayed = true;
        Ok(count)
    }
}

/// Visits every whole record of a journal's bytes and returns where they end and how many
/// there were. Damage at the end (an unfinished append) ends the scan; damage followed by
/// whole records is an error, and so is a checksummed record that does not decode.
fn scan(
    bytes: &[u8],
    path: &Path,
    visit: &mut dyn FnMut(Record),
) -> Result<(usize, u64), StoreError> {
    frame::scan(bytes, path, &is_record, &mut |offset, payload| {
        let record = codec::decode(payload).map_err(|error| StoreError::Corrupt {
            offset: offset as u64,
            reason: format!("a checksummed record does not decode: {error}"),
        })?;
        visit(record);
        Ok(())
    })
}

/// What [`backup()`] copied.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BackupCopied {
    /// The position of the first record copied: 0 unless the source's segments were trimmed.
    pub first_position: u64,
    pub records: u64,
    pub bytes: u64,
}

/// Copies the store in `from` to a new data directory `to`, which must not hold a journal yet.
/// The copy is durable on return.
///
/// - A store with an engine must not be running (its lock is taken): it is opened and copied
///   as a running server copies itself ([`backup::backup_open`]); a running server is asked
///   instead ([`backup::ask_running_server`]).
/// - A journal alone (segments, or an earlier single file) is copied consistently even while
///   a server appends to it: the journal only grows, and every prefix of whole records is a
///   state the server was in, so the copy takes the whole records present when it reads.
pub fn backup(from: &Path, to: &Path) -> Result<BackupCopied, StoreError> {
    if from.join(ENGINE_DIR).exists() {
        // The store is not running (its lock is free): open it and copy as a server would.
        let (_journal, checkpoints) = cached::open(from, 8 << 20)?;
        return backup::backup_open(checkpoints.engine(), from, to);
    }
    if segments::holds_segments(from)? {
        return segments::backup(from, to);
    }
    let source = from.join(JOURNAL_FILE);
    let bytes = std::fs::read(&source)?;
    let (end, records) = scan(&bytes, &source, &mut |_| {})?;
    refuse_a_target_with_a_journal(to)?;
    let target = to.join(JOURNAL_FILE);
    let partial = to.join(format!("{JOURNAL_FILE}.partial"));
    {
        let mut file = File::create(&partial)?;
        file.write_all(&bytes[..end])?;
        file.sync_all()?;
    }
    std::fs::rename(&partial, &target)?;
    sync_dir(to)?;
    Ok(BackupCopied {
        first_position: 0,
        records,
        bytes: end as u64,
    })
}

/// Creates `to` if need be, and refuses it if it holds a journal of either layout.
fn refuse_a_target_with_a_journal(to: &Path) -> Result<(), StoreError> {
    std::fs::create_dir_all(to)?;
    if to.join(JOURNAL_FILE).exists() || to.join(SEGMENTS_DIR).exists() {
        return Err(StoreError::Io(std::io::Error::new(
            std::io::ErrorKind::AlreadyExists,
            format!("{} already holds a journal", to.display()),
        )));
    }
    Ok(())
}
