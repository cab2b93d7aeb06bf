//! The segmented journal: appends roll over to a new segment at the size limit, never within
//! an append; replay runs across segments and from any position the journal holds; trimming
//! removes whole segments from the front, never the last, and a crash part way leaves a journal
//! that replays from the trim position; a torn tail of the last segment is cut; damage in an
//! earlier segment, and segments that do not meet, are refused; a single-file journal becomes
//! the first segment; a backup copies whole records and reads back as the same journal; with
//! spares, a rollover takes a segment made ahead (the magic and zeros), the zeros are never
//! read as records, and an append torn inside them is cut.

mod common;

use std::fs::OpenOptions;
use std::io::Write;
use std::ops::Range;
use std::path::{Path, PathBuf};

use farthing_payments::{Record, codec};
use farthing_store::{Journal, StoreError};
use farthing_store_embedded::{
    FileJournal, SEGMENT_BYTES_MAX, SEGMENTS_DIR, SegmentedJournal, Segments, backup,
};

use common::{JournalFile, TempDir, records};

/// Small segments, so that a few appends fill several.
const SMALL_SEGMENT_BYTES_MAX: u64 = 256;

/// A payload of some length (empty for 0), telling its position.
fn payload(n: u64) -> Vec<u8> {
    let mut bytes = if n == 0 {
        Vec::new()
    } else {
        format!("payload {n}").into_bytes()
    };
    bytes.resize(bytes.len() + (n as usize * 7) % 23, n as u8);
    bytes
}

/// Appends the payloads of `positions` in one append.
fn append(segments: &mut Segments, positions: Range<u64>) {
    assert_eq!(segments.end_position(), positions.start);
    let payloads: Vec<Vec<u8>> = positions.clone().map(payload).collect();
    segments
        .append(payloads.iter().map(Vec::as_slice))
        .expect("appends");
    assert_eq!(segments.end_position(), positions.end);
}

/// Appends positions `0..end` in appends of `per_append`.
fn fill(segments: &mut Segments, end: u64, per_append: u64) {
    let mut at = segments.end_position();
    while at < end {
        let next = (at + per_append).min(end);
        append(segments, at..next);
        at = next;
    }
}

fn replay_from(segments: &Segments, position: u64) -> Result<Vec<(u64, Vec<u8>)>, StoreError> {
    let mut seen = Vec::new();
    let count = segments.replay_from(position, &mut |at, payload| {
        seen.push((at, payload.to_vec()));
        Ok(())
    })?;
    assert_eq!(count, seen.len() as u64, "replay counts what it visits");
    Ok(seen)
}

fn expected(positions: Range<u64>) -> Vec<(u64, Vec<u8>)> {
    positions.map(|n| (n, payload(n))).collect()
}

fn open_small(dir: &TempDir) -> Segments {
    Segments::open(dir.path(), SMALL_SEGMENT_BYTES_MAX).expect("opens")
}

/// The segment files, oldest first: each one's first position and path.
fn segment_files(dir: &TempDir) -> Vec<(u64, PathBuf)> {
    let mut files: Vec<(u64, PathBuf)> = std::fs::read_dir(dir.path().join(SEGMENTS_DIR))
        .expect("the segments' directory")
        .map(|entry| entry.expect("an entry").path())
        .filter_map(|path| {
            let name = path.file_name().expect("a name").to_str().expect("UTF-8");
            // A spare is not a segment until a rollover renames it.
            let digits = name.strip_suffix(".farthing")?;
            assert_eq!(digits.len(), 20, "{name}");
            Some((digits.parse().expect("a position"), path))
        })
        .collect();
    files.sort();
    files
}

fn file_len(path: &Path) -> u64 {
    std::fs::metadata(path).expect("the file").len()
}

fn expect_corrupt<T>(result: Result<T, StoreError>, what: &str) {
    match result {
        Err(StoreError::Corrupt { .. }) => {}
        Err(other) => panic!("{what}: expected Corrupt, got {other}"),
        Ok(_) => panic!("{what}: accepted"),
    }
}

#[test]
fn payloads_appended_in_several_commits_come_back_in_order_with_their_positions_after_reopening() {
    let dir = TempDir::new("segments-order");
    {
        let mut segments = Segments::open(dir.path(), SEGMENT_BYTES_MAX).expect("opens");
        assert_eq!(segments.first_position(), 0);
        assert_eq!(segments.end_position(), 0);
        append(&mut segments, 0..4);
        segments
            .append(std::iter::empty())
            .expect("an empty append is fine");
        append(&mut segments, 4..5);
        append(&mut segments, 5..9);
        assert_eq!(replay_from(&segments, 0).expect("replays"), expected(0..9));
    }
    let segments = Segments::open(dir.path(), SEGMENT_BYTES_MAX).expect("reopens");
    assert_eq!(segments.end_position(), 9);
    assert_eq!(segments.segment_count(), 1);
    assert_eq!(replay_from(&segments, 0).expect("replays"), expected(0..9));
}

#[test]
fn a_new_segment_starts_once_the_last_reaches_the_size_limit_and_an_append_never_spans_two() {
    let dir = TempDir::new("segments-rollover");
    let mut segments = open_small(&dir);
    // Appends of 3 payloads: every segment must hold whole appends only.
    let mut append_starts = Vec::new();
    for start in (0..60).step_by(3) {
        append_starts.push(start);
        let files_before = segment_files(&dir);
        let last_len = file_len(&files_before.last().expect("a segment").1);
        append(&mut segments, start..start + 3);
        let files_after = segment_files(&dir);
        if last_len >= SMALL_SEGMENT_BYTES_MAX {
            assert_eq!(files_after.len(), files_before.len() + 1, "rolled over");
            assert_eq!(files_after.last().expect("a segment").0, start);
        } else {
            assert_eq!(files_after, files_before, "no rollover below the limit");
        }
    }
    let files = segment_files(&dir);
    assert!(files.len() >= 4, "{} segments", files.len());
    assert_eq!(segments.segment_count(), files.len());
    for (index, (first, path)) in files.iter().enumerate() {
        assert!(
            append_starts.contains(first),
            "segment {first} starts where an append starts"
        );
        if index + 1 < files.len() {
            assert!(
                file_len(path) >= SMALL_SEGMENT_BYTES_MAX,
                "segment {first} was full before the next began"
            );
        }
    }
    drop(segments);
    let segments = open_small(&dir);
    assert_eq!(segments.end_position(), 60);
    assert_eq!(replay_from(&segments, 0).expect("replays"), expected(0..60));
}

#[test]
fn replay_runs_across_segments_from_every_position_the_journal_holds() {
    let dir = TempDir::new("segments-replay-from");
    let mut segments = open_small(&dir);
    fill(&mut segments, 40, 2);
    assert!(segments.segment_count() > 2);
    for position in 0..=40 {
        assert_eq!(
            replay_from(&segments, position).expect("replays"),
            expected(position..40),
            "from {position}"
        );
    }
    expect_corrupt(replay_from(&segments, 41), "a position past the end");
}

#[test]
fn trimming_removes_the_segments_wholly_before_a_position_and_replay_from_it_still_works() {
    let dir = TempDir::new("segments-trim");
    let mut segments = open_small(&dir);
    fill(&mut segments, 50, 2);
    let files = segment_files(&dir);
    let before = 23;
    // The segments whose every record is below 23: those whose successor starts at or before.
    let removable = files
        .windows(2)
        .take_while(|pair| pair[1].0 <= before)
        .count();
    assert!(removable >= 2, "{removable} removable segments");
    assert_eq!(segments.trim(before).expect("trims"), removable);
    let kept = segment_files(&dir);
    assert_eq!(kept, files[removable..]);
    assert!(kept[0].0 <= before, "the segment holding {before} is kept");
    assert_eq!(segments.first_position(), kept[0].0);
    assert_eq!(
        replay_from(&segments, before).expect("replays"),
        expected(before..50)
    );
    expect_corrupt(
        replay_from(&segments, kept[0].0 - 1),
        "a position before the first kept",
    );
    // Trimming again to the same place removes nothing.
    assert_eq!(segments.trim(before).expect("trims"), 0);
    drop(segments);

    let mut segments = open_small(&dir);
    assert_eq!(
        segments.first_position(),
        kept[0].0,
        "reported after a reopen"
    );
    assert_eq!(segments.end_position(), 50);
    assert_eq!(
        replay_from(&segments, kept[0].0).expect("replays"),
        expected(kept[0].0..50)
    );
    append(&mut segments, 50..53);
    assert_eq!(
        replay_from(&segments, before).expect("replays"),
        expected(before..53)
    );
}

#[test]
fn trimming_never_removes_the_segment_being_written() {
    let dir = TempDir::new("segments-trim-active");
    let mut segments = open_small(&dir);
    fill(&mut segments, 30, 3);
    let files = segment_files(&dir);
    let last = files.last().expect("a segment").clone();
    assert_eq!(segments.trim(30).expect("trims"), files.len() - 1);
    assert_eq!(segment_files(&dir), vec![last.clone()]);
    assert_eq!(segments.first_position(), last.0);
    // Nothing more to remove, even though every record is below the position.
    assert_eq!(segments.trim(30).expect("trims"), 0);
    assert_eq!(replay_from(&segments, 30).expect("replays"), Vec::new());
    append(&mut segments, 30..32);
    drop(segments);
    let segments = open_small(&dir);
    assert_eq!(
        replay_from(&segments, last.0).expect("replays"),
        expected(last.0..32)
    );
}

#[test]
fn a_crash_part_way_through_trimming_leaves_a_journal_that_replays_from_the_trim_position() {
    let before = 37;
    let source = TempDir::new("segments-trim-crash-source");
    let files = {
        let mut segments = open_small(&source);
        fill(&mut segments, 60, 2);
        segment_files(&source)
    };
    let removable = files
        .windows(2)
        .take_while(|pair| pair[1].0 <= before)
        .count();
    assert!(removable >= 3, "{removable} removable segments");
    // Oldest first: a crash after any number of removals leaves the newest segments.
    for removed in 0..=removable {
        let dir = TempDir::new("segments-trim-crash");
        std::fs::create_dir_all(dir.path().join(SEGMENTS_DIR)).expect("a directory");
        for (_, path) in &files[removed..] {
            let copy = dir
                .path()
                .join(SEGMENTS_DIR)
                .join(path.file_name().expect("a name"));
            std::fs::copy(path, copy).expect("copies");
        }
        let mut segments = open_small(&dir);
        assert_eq!(
            segments.first_position(),
            files[removed].0,
            "{removed} removed"
        );
        assert_eq!(segments.end_position(), 60);
        assert_eq!(
            replay_from(&segments, before).expect("replays"),
            expected(before..60),
            "{removed} removed"
        );
        // Trimming again finishes the job.
        assert_eq!(segments.trim(before).expect("trims"), removable - removed);
        assert_eq!(segment_files(&dir).len(), files.len() - removable);
    }
}

#[test]
fn a_tail_torn_at_any_byte_of_the_last_segment_is_cut_and_appends_continue() {
    let source = TempDir::new("segments-torn-source");
    let (files, last_start, end) = {
        let mut segments = open_small(&source);
        fill(&mut segments, 20, 2);
        let (_, before) = segment_files(&source).last().expect("a segment").clone();
        let len_before = file_len(&before);
        append(&mut segments, 20..21);
        let (first, after) = segment_files(&source).last().expect("a segment").clone();
        // Where the last append's frames start: after the magic, if it rolled over.
        let last_start = if after == before { len_before } else { 8 };
        assert_eq!(first < 20, after == before);
        (segment_files(&source), last_start, file_len(&after))
    };
    for torn_end in last_start + 1..end {
        let dir = TempDir::new("segments-torn");
        std::fs::create_dir_all(dir.path().join(SEGMENTS_DIR)).expect("a directory");
        for (_, path) in &files {
            let copy = dir
                .path()
                .join(SEGMENTS_DIR)
                .join(path.file_name().expect("a name"));
            std::fs::copy(path, &copy).expect("copies");
        }
        let last = segment_files(&dir).last().expect("a segment").1.clone();
        OpenOptions::new()
            .write(true)
            .open(&last)
            .expect("opens")
            .set_len(torn_end)
            .expect("tears");
        let mut segments = open_small(&dir);
        assert_eq!(segments.end_position(), 20, "torn at {torn_end}");
        assert_eq!(file_len(&last), last_start, "the tail is cut");
        assert_eq!(replay_from(&segments, 0).expect("replays"), expected(0..20));
        append(&mut segments, 20..22);
        drop(segments);
        let segments = open_small(&dir);
        assert_eq!(replay_from(&segments, 0).expect("replays"), expected(0..22));
    }
}

#[test]
fn damage_anywhere_in_a_segment_before_the_last_is_refused_and_nothing_is_cut() {
    let dir = TempDir::new("segments-damage");
    {
        let mut segments = open_small(&dir);
        fill(&mut segments, 40, 2);
    }
    let files = segment_files(&dir);
    assert!(files.len() >= 3);
    let (middle_first, middle) = files[1].clone();
    let intact = std::fs::read(&middle).expect("reads");
    let mut damaged_copies = Vec::new();
    for at in 0..intact.len() {
        for bit in 0..8 {
            let mut bytes = intact.clone();
            bytes[at] ^= 1 << bit;
            damaged_copies.push((format!("byte {at}, bit {bit}"), bytes));
        }
    }
    // Torn as the last segment may be: a segment with one after it never is.
    for len in 0..intact.len() {
        damaged_copies.push((format!("cut at {len}"), intact[..len].to_vec()));
    }
    for (what, bytes) in damaged_copies {
        std::fs::write(&middle, &bytes).expect("writes");
        let segments = open_small(&dir);
        expect_corrupt(replay_from(&segments, 0), &what);
        expect_corrupt(replay_from(&segments, middle_first), &what);
        drop(segments);
        assert_eq!(
            std::fs::read(&middle).expect("reads"),
            bytes,
            "{what}: a refused segment is left as it was"
        );
    }
    std::fs::write(&middle, &intact).expect("writes");
    let segments = open_small(&dir);
    assert_eq!(replay_from(&segments, 0).expect("replays"), expected(0..40));
}

#[test]
fn segments_that_do_not_meet_are_refused() {
    let dir = TempDir::new("segments-gap");
    {
        let mut segments = open_small(&dir);
        fill(&mut segments, 40, 2);
    }
    let files = segment_files(&dir);
    assert!(files.len() >= 4);
    // A middle segment lost: the one before it ends where the lost one began.
    std::fs::remove_file(&files[2].1).expect("removes");
    let segments = open_small(&dir);
    expect_corrupt(replay_from(&segments, 0), "from the start");
    expect_corrupt(
        replay_from(&segments, files[1].0),
        "from the segment before the gap",
    );
    expect_corrupt(
        replay_from(&segments, files[2].0),
        "from a position in the gap",
    );
    // From the segment after the gap on, every record is there.
    assert_eq!(
        replay_from(&segments, files[3].0).expect("replays"),
        expected(files[3].0..40)
    );
    drop(segments);
    // Segments that overlap do not meet either.
    std::fs::copy(&files[1].1, &files[2].1).expect("copies");
    let renamed = files[2]
        .1
        .with_file_name(format!("{:020}.farthing", files[2].0 - 1));
    std::fs::rename(&files[2].1, &renamed).expect("renames");
    let segments = open_small(&dir);
    expect_corrupt(replay_from(&segments, 0), "overlapping segments");
}

#[test]
fn replay_from_a_position_the_journal_no_longer_holds_is_refused() {
    let dir = TempDir::new("segments-trimmed-too-far");
    let mut segments = open_small(&dir);
    fill(&mut segments, 40, 2);
    segments.trim(30).expect("trims");
    let first = segments.first_position();
    assert!(first > 0);
    match replay_from(&segments, first - 1) {
        Err(StoreError::Corrupt { reason, .. }) => {
            assert!(reason.contains("trimmed"), "{reason}");
        }
        other => panic!("expected Corrupt, got {other:?}"),
    }
    assert_eq!(
        replay_from(&segments, first).expect("replays"),
        expected(first..40)
    );
}

#[test]
fn an_empty_last_segment_left_by_an_unfinished_rollover_is_removed_and_appends_continue_before_it()
{
    // Nothing, part of the magic, the magic, or a spare renamed into place: magic and zeros.
    let mut spare = b"FARTHJ01".to_vec();
    spare.resize(4096, 0);
    for leftover in [Vec::new(), b"FARTH".to_vec(), b"FARTHJ01".to_vec(), spare] {
        let dir = TempDir::new("segments-unfinished-rollover");
        {
            let mut segments = Segments::open(dir.path(), SEGMENT_BYTES_MAX).expect("opens");
            fill(&mut segments, 10, 3);
        }
        // A rollover that failed at position 7, after which the segment went on to 10.
        let stale = dir
            .path()
            .join(SEGMENTS_DIR)
            .join(format!("{:020}.farthing", 7));
        std::fs::write(&stale, &leftover).expect("writes");
        let mut segments = Segments::open(dir.path(), SEGMENT_BYTES_MAX).expect("opens");
        assert!(!stale.exists(), "{leftover:?}: removed");
        assert_eq!(segments.end_position(), 10);
        append(&mut segments, 10..12);
        assert_eq!(replay_from(&segments, 0).expect("replays"), expected(0..12));
    }
}

#[test]
fn a_single_file_journal_becomes_the_segment_at_position_zero() {
    let dir = TempDir::new("segments-single-file");
    let written = records(0..7);
    {
        let mut journal = FileJournal::open(dir.path()).expect("opens");
        journal.replay(&mut |_| {}).expect("replays");
        journal.append(&written[..3]).expect("appends");
        journal.append(&written[3..]).expect("appends");
    }
    let single = std::fs::read(dir.journal_file()).expect("reads");
    let mut segments = Segments::open(dir.path(), SEGMENT_BYTES_MAX).expect("opens");
    assert!(!dir.journal_file().exists(), "moved");
    let files = segment_files(&dir);
    assert_eq!(files.len(), 1);
    assert_eq!(files[0].0, 0);
    assert_eq!(std::fs::read(&files[0].1).expect("reads"), single);
    assert_eq!(segments.end_position(), 7);
    let mut decoded = Vec::new();
    segments
        .replay_from(0, &mut |_, payload| {
            decoded.push(codec::decode(payload).expect("a record"));
            Ok(())
        })
        .expect("replays");
    assert_eq!(decoded, written);
    segments
        .append([b"after the move".as_slice()])
        .expect("appends");
    drop(segments);
    // The single-file journal would start afresh beside the segments: it refuses instead.
    match FileJournal::open(dir.path()) {
        Err(StoreError::Io(error)) => {
            assert_eq!(error.kind(), std::io::ErrorKind::InvalidData, "{error}");
        }
        Err(other) => panic!("expected InvalidData, got {other}"),
        Ok(_) => panic!("a single-file journal opened over segments"),
    }
    assert!(!dir.journal_file().exists());
}

#[test]
fn a_single_file_journal_beside_segments_is_refused_rather_than_guessed_at() {
    let dir = TempDir::new("segments-both");
    {
        let mut segments = Segments::open(dir.path(), SEGMENT_BYTES_MAX).expect("opens");
        append(&mut segments, 0..2);
    }
    std::fs::write(dir.journal_file(), b"FARTHJ01").expect("writes");
    expect_corrupt(
        Segments::open(dir.path(), SEGMENT_BYTES_MAX),
        "a file and segments",
    );
}

#[test]
fn a_file_named_like_a_segment_but_not_after_a_position_is_refused() {
    for name in [
        "1.farthing",
        "0000000000000000000x.farthing",
        "99999999999999999999.farthing",
    ] {
        let dir = TempDir::new("segments-bad-name");
        std::fs::create_dir_all(dir.path().join(SEGMENTS_DIR)).expect("a directory");
        std::fs::write(dir.path().join(SEGMENTS_DIR).join(name), b"FARTHJ01").expect("writes");
        expect_corrupt(Segments::open(dir.path(), SEGMENT_BYTES_MAX), name);
    }
}

#[test]
fn a_directory_is_locked_while_its_segments_are_open_and_free_once_they_are_dropped() {
    let dir = TempDir::new("segments-lock");
    let segments = Segments::open(dir.path(), SEGMENT_BYTES_MAX).expect("opens");
    for attempt in [
        Segments::open(dir.path(), SEGMENT_BYTES_MAX).map(|_| ()),
        FileJournal::open(dir.path()).map(|_| ()),
    ] {
        match attempt {
            Err(StoreError::Locked(_)) => {}
            Err(other) => panic!("expected Locked, got {other}"),
            Ok(()) => panic!("a second journal opened the same directory"),
        }
    }
    drop(segments);
    Segments::open(dir.path(), SEGMENT_BYTES_MAX).expect("opens once the first is gone");
}

#[test]
fn a_backup_of_trimmed_segments_copies_their_whole_records_and_leaves_an_append_in_progress_out() {
    let from = TempDir::new("segments-backup-from");
    let mut segments = open_small(&from);
    fill(&mut segments, 50, 2);
    segments.trim(17).expect("trims");
    let first = segments.first_position();
    // An append in progress: half a frame at the end of the last segment.
    let last = segment_files(&from).last().expect("a segment").1.clone();
    {
        let mut file = OpenOptions::new().append(true).open(&last).expect("opens");
        file.write_all(&[9, 0, 0, 0, 1, 2]).expect("writes");
    }
    let to = TempDir::new("segments-backup-to");
    let target = to.path().join("copy");
    let copied = backup(from.path(), &target).expect("backs up");
    assert_eq!(copied.first_position, first);
    assert_eq!(copied.records, 50 - first);
    let copy = Segments::open(&target, SMALL_SEGMENT_BYTES_MAX).expect("opens the copy");
    assert_eq!(copy.first_position(), first);
    assert_eq!(copy.end_position(), 50);
    assert_eq!(
        replay_from(&copy, first).expect("replays"),
        expected(first..50)
    );
    let source_files: Vec<u64> = segment_files(&from).iter().map(|file| file.0).collect();
    let copy_files: Vec<u64> = std::fs::read_dir(target.join(SEGMENTS_DIR))
        .expect("the copy's segments")
        .map(|entry| {
            let name = entry.expect("an entry").file_name();
            let name = name.to_str().expect("UTF-8");
            name.trim_end_matches(".farthing")
                .parse()
                .expect("a position")
        })
        .collect::<std::collections::BTreeSet<u64>>()
        .into_iter()
        .collect();
    assert_eq!(copy_files, source_files, "the same segments");
    drop(copy);
    // A second backup into the same place is refused.
    match backup(from.path(), &target) {
        Err(StoreError::Io(error)) => {
            assert_eq!(error.kind(), std::io::ErrorKind::AlreadyExists);
        }
        other => panic!("expected AlreadyExists, got {other:?}"),
    }
    // The source journal goes on.
    append(&mut segments, 50..51);
}

#[test]
fn a_backup_of_a_single_file_journal_is_still_a_single_file() {
    let from = TempDir::new("segments-backup-single-from");
    {
        let mut journal = FileJournal::open(from.path()).expect("opens");
        journal.replay(&mut |_| {}).expect("replays");
        journal.append(&records(0..5)).expect("appends");
    }
    let to = TempDir::new("segments-backup-single-to");
    let copied = backup(from.path(), to.path()).expect("backs up");
    assert_eq!(copied.first_position, 0);
    assert_eq!(copied.records, 5);
    assert!(to.journal_file().exists());
    assert!(!to.path().join(SEGMENTS_DIR).exists());
    let mut copy = FileJournal::open(to.path()).expect("opens the copy");
    let mut replayed = Vec::new();
    copy.replay(&mut |record| replayed.push(record))
        .expect("replays");
    assert_eq!(replayed, records(0..5));
}

#[test]
fn the_segmented_journal_serves_the_records_port_and_refuses_a_trimmed_journal() {
    let dir = TempDir::new("segments-records");
    let written = records(0..9);
    {
        let mut journal = SegmentedJournal::open(dir.path()).expect("opens");
        assert_eq!(journal.replay(&mut |_| {}).expect("replays"), 0);
        journal.append(&written[..4]).expect("appends");
        journal.append(&[]).expect("an empty append is fine");
        journal.append(&written[4..]).expect("appends");
        assert_eq!(journal.segments().end_position(), 9);
    }
    let mut journal = SegmentedJournal::open(dir.path()).expect("reopens");
    let mut replayed: Vec<Record> = Vec::new();
    let count = journal
        .replay(&mut |record| replayed.push(record))
        .expect("replays");
    assert_eq!(count, 9);
    assert_eq!(replayed, written);
    drop(journal);

    // Trimmed, it no longer holds the records a state in memory is rebuilt from.
    {
        let mut segments = open_small(&dir);
        let payloads: Vec<Vec<u8>> = records(9..30)
            .iter()
            .map(|record| {
                let mut bytes = Vec::new();
                codec::encode(record, &mut bytes);
                bytes
            })
            .collect();
        for payload in &payloads {
            segments.append([payload.as_slice()]).expect("appends");
        }
        assert!(segments.trim(20).expect("trims") > 0);
    }
    let mut journal = SegmentedJournal::open(dir.path()).expect("reopens");
    expect_corrupt(journal.replay(&mut |_| {}), "a trimmed journal");
}

#[test]
#[should_panic(expected = "replay the journal before appending")]
fn appending_to_the_segmented_journal_before_replaying_is_refused() {
    let dir = TempDir::new("segments-no-replay");
    let mut journal = SegmentedJournal::open(dir.path()).expect("opens");
    let _ = journal.append(&records(0..1));
}

fn open_small_with_spares(dir: &TempDir) -> Segments {
    let mut segments = open_small(dir).with_spares();
    segments.wait_for_spare();
    segments
}

fn spare_path(dir: &TempDir) -> PathBuf {
    dir.path().join(SEGMENTS_DIR).join("spare")
}

#[test]
fn a_rollover_takes_the_spare_made_ahead_and_its_zeros_are_never_read_as_records() {
    let dir = TempDir::new("segments-spares");
    let mut segments = open_small_with_spares(&dir);
    assert_eq!(file_len(&spare_path(&dir)), SMALL_SEGMENT_BYTES_MAX);
    // The first segment was not made ahead: once it holds a record, the next append moves to
    // the spare, though the first is far from full.
    append(&mut segments, 0..1);
    assert_eq!(segment_files(&dir).len(), 1);
    append(&mut segments, 1..2);
    let files = segment_files(&dir);
    assert_eq!(
        files.iter().map(|(first, _)| *first).collect::<Vec<_>>(),
        [0, 1]
    );
    segments.wait_for_spare();
    let mut rollovers = 0;
    for start in (2..62).step_by(3) {
        let before = segment_files(&dir).len();
        append(&mut segments, start..start + 3);
        let files = segment_files(&dir);
        if files.len() > before {
            rollovers += 1;
            // Made ahead: as long as a full segment, though it holds one append.
            let (first, path) = files.last().expect("a segment");
            assert_eq!(*first, start);
            assert_eq!(file_len(path), SMALL_SEGMENT_BYTES_MAX, "segment {first}");
        }
        // The next spare is ready before the next rollover.
        segments.wait_for_spare();
    }
    assert!(rollovers >= 3, "{rollovers} rollovers");
    drop(segments);
    // Reopened (with spares or without), the zeros after the last append are room, not
    // damage: nothing is cut, and every record comes back once.
    let last = segment_files(&dir).last().expect("a segment").1.clone();
    let len_before = file_len(&last);
    let mut segments = open_small(&dir);
    assert_eq!(file_len(&last), len_before, "the room is kept");
    assert!(!spare_path(&dir).exists(), "a spare left behind is removed");
    assert_eq!(segments.end_position(), 62);
    assert_eq!(replay_from(&segments, 0).expect("replays"), expected(0..62));
    append(&mut segments, 62..63);
    drop(segments);
    let segments = open_small_with_spares(&dir);
    assert_eq!(replay_from(&segments, 0).expect("replays"), expected(0..63));
    let copy = TempDir::new("segments-spares-backup");
    let copied = backup(dir.path(), copy.path()).expect("backs up");
    assert_eq!(copied.records, 63 - segments.first_position());
}

#[test]
fn an_append_torn_inside_a_spare_is_cut_so_that_no_part_of_it_is_read_after_later_appends() {
    let dir = TempDir::new("segments-spares-torn");
    let mut segments = open_small_with_spares(&dir);
    // Fill the first segment, then roll over into the spare with one append.
    while segment_files(&dir).len() < 2 {
        let at = segments.end_position();
        append(&mut segments, at..at + 3);
    }
    let (first, last) = segment_files(&dir).last().expect("a segment").clone();
    assert!(first > 0, "rolled over");
    let end = segments.end_position();
    drop(segments);
    assert_eq!(file_len(&last), SMALL_SEGMENT_BYTES_MAX, "room made ahead");
    // A later append that reached the disk only in part: some of its bytes inside the zeros.
    let records_end = {
        let bytes = std::fs::read(&last).expect("reads");
        bytes.iter().rposition(|byte| *byte != 0).expect("records") + 1
    };
    let mut file = OpenOptions::new().write(true).open(&last).expect("opens");
    use std::io::{Seek, SeekFrom};
    file.seek(SeekFrom::Start(records_end as u64 + 5))
        .expect("seeks");
    file.write_all(b"half an append").expect("writes");
    drop(file);
    let mut segments = open_small(&dir);
    assert_eq!(segments.end_position(), end);
    assert_eq!(file_len(&last), records_end as u64, "the torn tail is cut");
    assert_eq!(
        replay_from(&segments, 0).expect("replays"),
        expected(0..end)
    );
    append(&mut segments, end..end + 1);
    drop(segments);
    let segments = open_small(&dir);
    assert_eq!(
        replay_from(&segments, 0).expect("replays"),
        expected(0..end + 1)
    );
}
