//! The journal as a series of segment files, so that records a checkpoint already holds can be
//! dropped from the front while appends go on at the back.
//!
//! Layout: `journal/<first position, 20 digits>.farthing` in the data directory. A record's
//! position is the count of records before it, over the journal's whole life; a segment is
//! named after the position of its first record and holds every record up to the next
//! segment's first. Each segment has the single file's format: the magic, then checksummed
//! frames (`frame.rs`). Payloads are bytes: the caller owns their encoding.
//!
//! - **Appends** go to the last segment, one `write` and one `fdatasync` each, however many
//!   payloads they carry (group commit). When the last segment has reached the size limit, the
//!   next append first starts a new segment (magic written and synced, the directory synced),
//!   so one append never spans two files.
//! - **Spares** (a server's journal, [`Segments::with_spares`], `cached::open_serving`): a
//!   thread makes the next segment ahead of time, its magic followed by zeros up to the size
//!   limit, synced, as `spare`; a rollover renames it into place. Appends then overwrite
//!   blocks already allocated and on disk, so their `fdatasync` has no file size or block map
//!   to commit: on ext4 it does not wait for the filesystem's journal, and with it for other
//!   files' writes (ADR 0004). Zeros are never a frame, so the end of the records is where the zeros begin.
//!   A segment not made ahead (the first, or the one written when the process started) is left
//!   for the spare as soon as one is ready and it holds a record.
//! - **Recovery** cuts a torn tail of the last segment, as the single file's does. An earlier
//!   segment was whole and durable before the one after it was created, so any damage in it
//!   is refused, never cut. A last segment that holds no record is what is left of a rollover
//!   the process did not finish: it is removed and the segment before it continues. The
//!   segments do not decode payloads, so a frame found after damage counts as a record when
//!   its checksum holds (the single file also asks the codec).
//! - **Trimming** removes whole segments from the front, oldest first, each removal made
//!   durable before the next, so a crash part way leaves a journal that still runs without a
//!   gap from its (new) first segment to its end. The segment being written is never removed.
//!
//! ```no_run
//! use farthing_store_embedded::segments::{Segments, SEGMENT_BYTES_MAX};
//! let mut journal = Segments::open("./farthing-data".as_ref(), SEGMENT_BYTES_MAX)?;
//! let replayed = journal.replay_from(journal.first_position(), &mut |position, payload| {
//!     let _ = (position, payload);
//!     Ok(())
//! })?;
//! journal.append([b"a payload".as_slice()])?;
//! journal.trim(journal.end_position())?;
//! # Ok::<(), farthing_store::StoreError>(())
//! ```
//!
//! Memory: replaying, opening and backing up read one whole segment at a time, so they need
//! about `segment_bytes_max` plus the largest append.

use std::collections::VecDeque;
use std::fs::{self, File, OpenOptions};
use std::io::{Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use farthing_payments::{Record, codec};
use farthing_store::{Journal, StoreError};

use crate::frame::{self, MAGIC};
use crate::{BackupCopied, JOURNAL_FILE, lock_data_dir, sync_dir};

/// The size at which a segment is full: the next append starts a new one. One append may take
/// a segment past it.
pub const SEGMENT_BYTES_MAX: u64 = 64 * 1024 * 1024;
/// The segments' directory inside the data directory.
pub const SEGMENTS_DIR: &str = "journal";
const SEGMENT_SUFFIX: &str = ".farthing";
/// Enough digits for any `u64`, so that names sort as their positions do.
const POSITION_DIGITS: usize = 20;
/// How many times a backup starts over when the server trims a segment it was about to copy.
const BACKUP_ATTEMPTS_MAX: u32 = 3;
/// The next segment, made ahead of time (no `.farthing` suffix: not a segment until renamed).
const SPARE: &str = "spare";
/// A spare being made.
const SPARE_PARTIAL: &str = "spare.partial";

/// What [`Segments::replay_from`] calls with each record: its position, its payload. An `Err`
/// ends the replay with it.
pub type VisitPayload<'a> = dyn FnMut(u64, &[u8]) -> Result<(), StoreError> + 'a;

/// The next segment, made ahead of time.
enum Spare {
    /// A thread is making it.
    Making(std::thread::JoinHandle<std::io::Result<()>>),
    /// [`SPARE`] is whole and synced.
    Ready,
}

/// A segmented journal of byte payloads, owning its data directory's lock.
pub struct Segments {
    /// The segments' directory.
    dir: PathBuf,
    segment_bytes_max: u64,
    /// The first position of each segment on disk, oldest first. Never empty; the last is the
    /// segment being written.
    firsts: VecDeque<u64>,
    /// The last segment, positioned at `len`.
    file: File,
    /// Bytes of the last segment that hold its magic and whole, verified frames.
    len: u64,
    /// The position the next payload appended will have.
    end: u64,
    buffer: Vec<u8>,
    /// Whether rollovers take a spare made ahead of time ([`Segments::with_spares`]).
    spares: bool,
    /// The next spare, being made or ready, until a rollover takes it.
    spare: Option<Spare>,
    /// Whether the last segment's file already reaches the size limit: a spare taken, or a
    /// segment that was full or made ahead before a restart.
    room_made: bool,
    /// Held for the journal's lifetime: one process per data directory.
    _lock: File,
}

impl Segments {
    /// Opens (or creates) the segmented journal in `data_dir`, taking the directory's lock.
    /// A single-file journal (`journal.farthing`) there becomes the segment at position 0.
    /// The last segment's torn tail, if any, is cut; earlier segments are read by
    /// [`Segments::replay_from`].
    pub fn open(data_dir: &Path, segment_bytes_max: u64) -> Result<Segments, StoreError> {
        assert!(
            segment_bytes_max > MAGIC.len() as u64,
            "a segment must have room for its magic and a record"
        );
        let lock = lock_data_dir(data_dir)?;
        let dir = data_dir.join(SEGMENTS_DIR);
        if !dir.is_dir() {
            fs::create_dir(&dir)?;
            sync_dir(data_dir)?;
        }
        adopt_single_file(data_dir, &dir)?;
        // A spare left by an earlier process may be unfinished: a new one is made if wanted.
        for leftover in [SPARE, SPARE_PARTIAL] {
            match fs::remove_file(dir.join(leftover)) {
                Err(error) if error.kind() != std::io::ErrorKind::NotFound => {
                    return Err(error.into());
                }
                _ => {}
            }
        }
        let mut firsts: VecDeque<u64> = list_segments(&dir)?.into();
        if firsts.is_empty() {
            create_segment(&dir, 0)?;
            firsts.push_back(0);
        }
        let (file, len, count) = loop {
            let last = *firsts.back().expect("at least one segment");
            let path = segment_path(&dir, last);
            let bytes = fs::read(&path)?;
            if holds_no_record(&bytes) && firsts.len() > 1 {
                // Created by a rollover that did not finish, or that failed: it holds no record,
                // and the segment before it may have gone on growing since. Appends continue
                // there (it is full, so the next append rolls over again).
                tracing::warn!(
                    segment = %path.display(),
                    "removing an empty last segment left by an unfinished rollover"
                );
                fs::remove_file(&path)?;
                sync_dir(&dir)?;
                firsts.pop_back();
                continue;
            }
            break recover_last(&path, &bytes)?;
        };
        let last = *firsts.back().expect("at least one segment");
        let room_made = file.metadata()?.len() >= segment_bytes_max;
        Ok(Segments {
            dir,
            segment_bytes_max,
            firsts,
            file,
            len,
            end: last + count,
            buffer: Vec::with_capacity(1 << 20),
            spares: false,
            spare: None,
            room_made,
            _lock: lock,
        })
    }

    /// From now on, the next segment is made ahead of time by a thread of its own, begun at
    /// the next append, and a rollover renames it into place (see the module's notes). Without
    /// a spare ready, a rollover makes its segment as before.
    pub fn with_spares(mut self) -> Segments {
        self.spares = true;
        self
    }

    /// Starts making a spare, unless one is being made or waits to be taken.
    fn make_spare(&mut self) {
        if !self.spares || self.spare.is_some() {
            return;
        }
        let (dir, bytes) = (self.dir.clone(), self.segment_bytes_max);
        match std::thread::Builder::new()
            .name("farthing-spare".into())
            .spawn(move || make_spare(&dir, bytes))
        {
            Ok(handle) => self.spare = Some(Spare::Making(handle)),
            Err(error) => tracing::warn!(%error, "cannot start making a spare segment"),
        }
    }

    /// Whether to roll over early, into a spare that is ready, from a segment that was not made
    /// ahead (the first one, or one written before a restart) and already holds a record:
    /// the appends after it then overwrite blocks already on disk.
    fn spare_waits_for_room(&mut self) -> bool {
        if self.room_made || self.end == *self.firsts.back().expect("at least one segment") {
            return false;
        }
        self.settle_spare(false);
        matches!(self.spare, Some(Spare::Ready))
    }

    /// Whether a spare is ready to be renamed into place; if so, it is taken. One still being
    /// made is left to finish, for a later rollover.
    fn spare_ready(&mut self) -> bool {
        self.settle_spare(false);
        if matches!(self.spare, Some(Spare::Ready)) {
            self.spare = None;
            return true;
        }
        false
    }

    /// Begins a spare if none is being made or ready, and waits until it is ready or has
    /// failed (so that the next rollover takes it): for tests and measurements.
    pub fn wait_for_spare(&mut self) {
        self.make_spare();
        self.settle_spare(true);
    }

    /// Learns whether the spare being made is ready, when it has finished (or `wait`s for it).
    fn settle_spare(&mut self, wait: bool) {
        let Some(Spare::Making(handle)) = &self.spare else {
            return;
        };
        if !wait && !handle.is_finished() {
            return;
        }
        let Some(Spare::Making(handle)) = self.spare.take() else {
            return;
        };
        match handle.join() {
            Ok(Ok(())) => self.spare = Some(Spare::Ready),
            Ok(Err(error)) => {
                tracing::warn!(%error, "making a spare segment failed; segments are made as needed");
            }
            Err(_) => tracing::warn!("the thread making a spare segment panicked"),
        }
    }

    /// The position of the first record the journal still holds (0 until it is trimmed).
    pub fn first_position(&self) -> u64 {
        *self.firsts.front().expect("at least one segment")
    }

    /// The position the next record appended will have: how many records were ever appended.
    pub fn end_position(&self) -> u64 {
        self.end
    }

    /// How many segment files the journal has.
    pub fn segment_count(&self) -> usize {
        self.firsts.len()
    }

    /// Appends `payloads` in order and returns once they are on stable storage. On `Err` none
    /// of them was appended and the journal is as it was. A failed fsync stops the process.
    pub fn append<'a>(
        &mut self,
        payloads: impl IntoIterator<Item = &'a [u8]>,
    ) -> Result<(), StoreError> {
        self.buffer.clear();
        let mut count = 0u64;
        for payload in payloads {
            frame::push_frame(&mut self.buffer, |out| out.extend_from_slice(payload));
            count += 1;
        }
        if count == 0 {
            return Ok(());
        }
        if self.len >= self.segment_bytes_max || self.spare_waits_for_room() {
            self.roll()?;
        }
        // The next spare is begun here: after a rollover took the last one, and at a
        // process's first append (not during a restart's replay, which it would slow).
        self.make_spare();
        frame::append_durably(&mut self.file, self.len, &self.buffer)?;
        self.len += self.buffer.len() as u64;
        self.end += count;
        if self.buffer.capacity() > 16 << 20 {
            self.buffer = Vec::with_capacity(1 << 20);
        }
        Ok(())
    }

    /// Starts the segment the next append goes to. On `Err` the journal goes on in the segment
    /// it was in; a file the failed attempt left behind holds no record, and recovery removes
    /// it.
    fn roll(&mut self) -> Result<(), StoreError> {
        let first = self.end;
        assert!(
            first > *self.firsts.back().expect("at least one segment"),
            "a full segment holds at least one record"
        );
        self.room_made = self.spare_ready();
        self.file = if self.room_made {
            take_spare(&self.dir, first)?
        } else {
            create_segment(&self.dir, first)?
        };
        self.firsts.push_back(first);
        self.len = MAGIC.len() as u64;
        Ok(())
    }

    /// Feeds every record at `position` or later, oldest first, to `visit` with its position,
    /// and returns how many there were. Fails when the journal no longer holds `position`
    /// (trimmed past it), when `position` is past the end, when two segments do not meet (a
    /// gap, or an overlap), and on any damage in a segment before the last. On `Err`, what was
    /// visited must be thrown away.
    pub fn replay_from(
        &self,
        position: u64,
        visit: &mut VisitPayload<'_>,
    ) -> Result<u64, StoreError> {
        let first = self.first_position();
        if position < first {
            return Err(StoreError::Corrupt {
                offset: 0,
                reason: format!(
                    "replay needs the records from position {position}, but the journal was \
                     trimmed: it starts at position {first}"
                ),
            });
        }
        if position > self.end {
            return Err(StoreError::Corrupt {
                offset: 0,
                reason: format!(
                    "replay needs the records from position {position}, but the journal ends \
                     at position {}",
                    self.end
                ),
            });
        }
        // The segment that holds `position`: the last one starting at or before it.
        let start = self.firsts.partition_point(|&first| first <= position) - 1;
        let mut visited = 0u64;
        for index in start..self.firsts.len() {
            let segment_first = self.firsts[index];
            let is_last = index + 1 == self.firsts.len();
            let path = segment_path(&self.dir, segment_first);
            let mut bytes = fs::read(&path)?;
            if is_last {
                // Recovery verified this much; nothing else writes to the directory we lock.
                if (bytes.len() as u64) < self.len {
                    return Err(StoreError::Corrupt {
                        offset: bytes.len() as u64,
                        reason: format!("{} shrank while open", path.display()),
                    });
                }
                bytes.truncate(self.len as usize);
            }
            let mut at = segment_first;
            let (end, count) = frame::scan(&bytes, &path, &|_| true, &mut |_offset, payload| {
                if at >= position {
                    visit(at, payload)?;
                    visited += 1;
                }
                at += 1;
                Ok(())
            })?;
            if end < bytes.len() {
                return Err(frame::damaged_before_last(&path, end));
            }
            let next = if is_last {
                self.end
            } else {
                self.firsts[index + 1]
            };
            if segment_first + count != next {
                return Err(StoreError::Corrupt {
                    offset: end as u64,
                    reason: format!(
                        "{} holds positions {segment_first} to {}, but the next record is at \
                         position {next}: the segments do not meet",
                        path.display(),
                        segment_first + count
                    ),
                });
            }
        }
        Ok(visited)
    }

    /// Removes, oldest first, every segment all of whose records are at positions below
    /// `before`, except the segment being written; returns how many were removed. Each removal
    /// is made durable before the next, so a crash part way leaves the newest segments, which
    /// still hold every record from `before` on.
    pub fn trim(&mut self, before: u64) -> Result<usize, StoreError> {
        assert!(
            before <= self.end,
            "trimming before position {before}, but the journal ends at {}",
            self.end
        );
        let mut removed = 0;
        // A segment ends where the next begins; the last one has no next and is never removed.
        while self.firsts.len() > 1 && self.firsts[1] <= before {
            let oldest = self.firsts[0];
            fs::remove_file(segment_path(&self.dir, oldest))?;
            self.firsts.pop_front();
            removed += 1;
            // A removal that is not durable could come back after a crash while a newer one
            // did not: a gap in front of the records recovery needs. Each is synced in turn.
            sync_dir(&self.dir)?;
        }
        Ok(removed)
    }
}

impl Drop for Segments {
    /// Lets a spare being made finish while the directory is still locked, so that the next
    /// process to open it never meets this one's spare half made.
    fn drop(&mut self) {
        self.settle_spare(true);
    }
}

/// The records port over segments: what a server may open in place of
/// [`FileJournal`](crate::FileJournal) once a checkpoint trims the journal. Replaying gives
/// every record from position 0, so it refuses a trimmed journal.
pub struct SegmentedJournal {
    segments: Segments,
    replayed: bool,
    /// Encoded records of one append, back to back, and where each ends.
    encoded: Vec<u8>,
    ends: Vec<usize>,
}

impl SegmentedJournal {
    /// From now on, segments are made ahead of time ([`Segments::with_spares`]), as a server's
    /// are.
    pub fn with_spares(self) -> SegmentedJournal {
        SegmentedJournal {
            segments: self.segments.with_spares(),
            ..self
        }
    }

    /// Opens (or creates) the segmented journal in `data_dir`, in segments of
    /// [`SEGMENT_BYTES_MAX`].
    pub fn open(data_dir: &Path) -> Result<SegmentedJournal, StoreError> {
        SegmentedJournal::open_with(data_dir, SEGMENT_BYTES_MAX)
    }

    /// [`SegmentedJournal::open`] with segments of `segment_bytes_max`.
    pub fn open_with(
        data_dir: &Path,
        segment_bytes_max: u64,
    ) -> Result<SegmentedJournal, StoreError> {
        Ok(SegmentedJournal {
            segments: Segments::open(data_dir, segment_bytes_max)?,
            replayed: false,
            encoded: Vec::new(),
            ends: Vec::new(),
        })
    }

    /// The segments beneath, for their positions.
    pub fn segments(&self) -> &Segments {
        &self.segments
    }
}

impl Journal for SegmentedJournal {
    fn append(&mut self, records: &[Record]) -> Result<(), StoreError> {
        assert!(self.replayed, "replay the journal before appending to it");
        self.encoded.clear();
        self.ends.clear();
        for record in records {
            codec::encode(record, &mut self.encoded);
            self.ends.push(self.encoded.len());
        }
        let encoded = &self.encoded;
        let mut start = 0;
        self.segments.append(self.ends.iter().map(|&end| {
            let payload = &encoded[start..end];
            start = end;
            payload
        }))
    }

    fn replay(&mut self, visit: &mut dyn FnMut(Record)) -> Result<u64, StoreError> {
        self.replay_from(0, visit)
    }

    fn replay_from(&mut self, from: u64, visit: &mut dyn FnMut(Record)) -> Result<u64, StoreError> {
        let count = self.segments.replay_from(from, &mut |position, payload| {
            let record = codec::decode(payload).map_err(|error| StoreError::Corrupt {
                offset: 0,
                reason: format!(
                    "the checksummed record at position {position} does not decode: {error}"
                ),
            })?;
            visit(record);
            Ok(())
        })?;
        self.replayed = true;
        Ok(count)
    }

    fn trim(&mut self, before: u64) -> Result<(), StoreError> {
        self.segments.trim(before).map(|_| ())
    }
}

/// Whether `data_dir` holds a segmented journal: at least one segment in `journal/`.
pub(crate) fn holds_segments(data_dir: &Path) -> Result<bool, StoreError> {
    match list_segments(&data_dir.join(SEGMENTS_DIR)) {
        Ok(firsts) => Ok(!firsts.is_empty()),
        Err(StoreError::Io(error)) if error.kind() == std::io::ErrorKind::NotFound => Ok(false),
        Err(error) => Err(error),
    }
}

/// Moves a single-file journal into `dir` as the segment at position 0.
///
/// Renaming it once, rather than reading it in place for ever, keeps one layout for every
/// later step (appends, trimming, backups only ever look in `journal/`). The rename is atomic:
/// after a crash the file has one name or the other, and opening again finishes the move. The
/// new name is synced (the segments' directory) before the old one's removal (the data
/// directory). A file under both names is refused rather than guessed at.
fn adopt_single_file(data_dir: &Path, dir: &Path) -> Result<(), StoreError> {
    let single = data_dir.join(JOURNAL_FILE);
    if !single.exists() {
        return Ok(());
    }
    if !list_segments(dir)?.is_empty() {
        return Err(StoreError::Corrupt {
            offset: 0,
            reason: format!(
                "{} holds both a single-file journal ({JOURNAL_FILE}) and segments \
                 ({SEGMENTS_DIR}/): remove the one that is not current",
                data_dir.display()
            ),
        });
    }
    tracing::info!(
        from = %single.display(),
        "moving the single-file journal into segments"
    );
    fs::rename(&single, segment_path(dir, 0))?;
    sync_dir(dir)?;
    sync_dir(data_dir)?;
    Ok(())
}

/// Creates the segment whose first record will be at `first`: the magic, synced, and its
/// directory entry synced. Nothing is left behind on `Err` unless even the removal failed, and
/// then recovery removes the empty segment.
fn create_segment(dir: &Path, first: u64) -> Result<File, StoreError> {
    let path = segment_path(dir, first);
    // Truncating, not `create_new`: the file can only be an earlier failed attempt at this
    // very segment, which holds no record.
    let mut file = OpenOptions::new()
        .create(true)
        .truncate(true)
        .read(true)
        .write(true)
        .open(&path)?;
    let made = file
        .write_all(MAGIC)
        .and_then(|()| file.sync_all())
        .and_then(|()| sync_dir(dir));
    if let Err(error) = made {
        let _ = fs::remove_file(&path);
        return Err(error.into());
    }
    Ok(file)
}

/// Makes a spare segment in `dir`: the magic, then zeros up to `bytes`, synced, then renamed
/// to [`SPARE`].
fn make_spare(dir: &Path, bytes: u64) -> std::io::Result<()> {
    let partial = dir.join(SPARE_PARTIAL);
    let made = fill_spare(&partial, bytes).and_then(|()| fs::rename(&partial, dir.join(SPARE)));
    if made.is_err() {
        // A full disk, say: what was written is given back.
        let _ = fs::remove_file(&partial);
    }
    made
}

fn fill_spare(partial: &Path, bytes: u64) -> std::io::Result<()> {
    let mut file = File::create(partial)?;
    file.write_all(MAGIC)?;
    let zeros = vec![0u8; 1 << 20];
    let mut written = MAGIC.len() as u64;
    while written < bytes {
        let chunk = zeros
            .len()
            .min(usize::try_from(bytes - written).unwrap_or(usize::MAX));
        file.write_all(&zeros[..chunk])?;
        written += chunk as u64;
    }
    file.sync_all()
}

/// Renames the spare into place as the segment whose first record will be at `first`, with
/// its directory entry synced, and opens it after its magic. On `Err` after the rename, the
/// segment holds no record, and recovery removes it.
fn take_spare(dir: &Path, first: u64) -> Result<File, StoreError> {
    let path = segment_path(dir, first);
    fs::rename(dir.join(SPARE), &path)?;
    sync_dir(dir)?;
    let mut file = OpenOptions::new().read(true).write(true).open(&path)?;
    file.seek(SeekFrom::Start(MAGIC.len() as u64))?;
    Ok(file)
}

/// Whether a segment's bytes hold no record: its magic or part of it, then nothing but zeros
/// (a spare renamed into place).
fn holds_no_record(bytes: &[u8]) -> bool {
    MAGIC.starts_with(bytes)
        || (bytes.starts_with(MAGIC) && frame::all_zeros(&bytes[MAGIC.len()..]))
}

/// Opens the last segment, whose bytes are `bytes`, for appending: cuts a torn tail, writes
/// the magic of a segment whose creation did not finish, and returns the file, the length of
/// its whole frames and their count.
fn recover_last(path: &Path, bytes: &[u8]) -> Result<(File, u64, u64), StoreError> {
    let mut file = OpenOptions::new().read(true).write(true).open(path)?;
    if bytes.len() < MAGIC.len() && MAGIC.starts_with(bytes) {
        file.set_len(0)?;
        file.write_all(MAGIC)?;
        file.sync_all()?;
        return Ok((file, MAGIC.len() as u64, 0));
    }
    let (end, count) = frame::scan(bytes, path, &|_| true, &mut |_, _| Ok(()))?;
    // Zeros after the records are a spare's room, kept for appends to come. Anything else is
    // an append that did not finish: cut, so that no part of it is read after later appends.
    if end < bytes.len() && !frame::all_zeros(&bytes[end..]) {
        tracing::warn!(
            segment = %path.display(),
            discarded_bytes = bytes.len() - end,
            "cutting an unfinished append from the end of the journal"
        );
        file.set_len(end as u64)?;
        file.sync_all()?;
    }
    file.seek(SeekFrom::Start(end as u64))?;
    Ok((file, end as u64, count))
}

fn segment_path(dir: &Path, first: u64) -> PathBuf {
    dir.join(format!("{first:0POSITION_DIGITS$}{SEGMENT_SUFFIX}"))
}

/// The first positions of the segments in `dir`, sorted. Files that do not end in `.farthing`
/// are not the journal's and are left alone; one that does but is not named by a position is
/// refused.
fn list_segments(dir: &Path) -> Result<Vec<u64>, StoreError> {
    let mut firsts = Vec::new();
    for entry in fs::read_dir(dir)? {
        let name = entry?.file_name();
        let Some(name) = name.to_str() else {
            continue;
        };
        let Some(digits) = name.strip_suffix(SEGMENT_SUFFIX) else {
            continue;
        };
        let first = (digits.len() == POSITION_DIGITS
            && digits.bytes().all(|byte| byte.is_ascii_digit()))
        .then(|| digits.parse::<u64>().ok())
        .flatten()
        .ok_or_else(|| StoreError::Corrupt {
            offset: 0,
            reason: format!("{} is not named after a position", dir.join(name).display()),
        })?;
        firsts.push(first);
    }
    firsts.sort_unstable();
    Ok(firsts)
}

/// Copies the segments in `from` to a new data directory `to`, in the same layout: every
/// segment whole, the last one up to its last whole record, then reads the copy back as a
/// journal to verify it. A segment trimmed while it was being copied starts the copy over, a
/// few times at most.
pub(crate) fn backup(from: &Path, to: &Path) -> Result<BackupCopied, StoreError> {
    crate::refuse_a_target_with_a_journal(to)?;
    if from.join(JOURNAL_FILE).exists() {
        return Err(StoreError::Corrupt {
            offset: 0,
            reason: format!(
                "{} holds both a single-file journal ({JOURNAL_FILE}) and segments \
                 ({SEGMENTS_DIR}/)",
                from.display()
            ),
        });
    }
    let mut attempts = 0;
    let copied = loop {
        attempts += 1;
        match copy_segments(from, to)? {
            Some(copied) => break copied,
            None if attempts < BACKUP_ATTEMPTS_MAX => continue,
            None => {
                return Err(StoreError::Io(std::io::Error::other(format!(
                    "segments of {} were trimmed while they were copied, {attempts} times",
                    from.display()
                ))));
            }
        }
    };
    let journal = Segments::open(to, SEGMENT_BYTES_MAX)?;
    let first = journal.first_position();
    let replayed = journal.replay_from(first, &mut |_, _| Ok(()))?;
    if first != copied.first_position || replayed != copied.records {
        return Err(StoreError::Corrupt {
            offset: 0,
            reason: format!(
                "the copy holds {replayed} records from position {first}, but {} records from \
                 position {} were copied",
                copied.records, copied.first_position
            ),
        });
    }
    Ok(copied)
}

/// One attempt at [`backup`]: `None` when a segment listed was gone by the time it was read.
fn copy_segments(from: &Path, to: &Path) -> Result<Option<BackupCopied>, StoreError> {
    let source = from.join(SEGMENTS_DIR);
    let mut firsts = list_segments(&source)?;
    let read = |first: u64| match fs::read(segment_path(&source, first)) {
        Ok(bytes) => Ok(Some(bytes)),
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(error) => Err(error),
    };
    // A last segment with no record yet (a rollover in progress) adds nothing: the one before
    // it is copied as the last, up to its last whole record.
    if firsts.len() > 1 {
        let last = *firsts.last().expect("segments");
        let Some(bytes) = read(last)? else {
            return Ok(None);
        };
        if holds_no_record(&bytes) {
            firsts.pop();
        }
    }
    let Some(&first_position) = firsts.first() else {
        return Err(StoreError::Io(std::io::Error::new(
            std::io::ErrorKind::NotFound,
            format!("{} holds no journal", from.display()),
        )));
    };
    let partial = to.join(format!("{SEGMENTS_DIR}.partial"));
    if partial.exists() {
        fs::remove_dir_all(&partial)?;
    }
    fs::create_dir(&partial)?;
    let mut copied = BackupCopied {
        first_position,
        records: 0,
        bytes: 0,
    };
    for (index, &first) in firsts.iter().enumerate() {
        let Some(bytes) = read(first)? else {
            return Ok(None);
        };
        let path = segment_path(&source, first);
        let is_last = index + 1 == firsts.len();
        let (end, count) = if is_last && bytes.len() < MAGIC.len() && MAGIC.starts_with(&bytes) {
            // The journal's only segment, being created.
            (MAGIC.len(), 0)
        } else {
            frame::scan(&bytes, &path, &|_| true, &mut |_, _| Ok(()))?
        };
        if !is_last {
            if end < bytes.len() {
                return Err(frame::damaged_before_last(&path, end));
            }
            let next = firsts[index + 1];
            if first + count != next {
                return Err(StoreError::Corrupt {
                    offset: end as u64,
                    reason: format!(
                        "{} holds positions {first} to {}, but the next segment starts at \
                         position {next}",
                        path.display(),
                        first + count
                    ),
                });
            }
        }
        let mut file = File::create(segment_path(&partial, first))?;
        if bytes.len() < MAGIC.len() {
            file.write_all(MAGIC)?;
        } else {
            file.write_all(&bytes[..end])?;
        }
        file.sync_all()?;
        copied.records += count;
        copied.bytes += end as u64;
    }
    sync_dir(&partial)?;
    fs::rename(&partial, to.join(SEGMENTS_DIR))?;
    sync_dir(to)?;
    Ok(Some(copied))
}
