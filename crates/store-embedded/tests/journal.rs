//! The file journal: what is appended comes back in order after a reopen; a torn tail is cut
//! and appends continue; damage followed by whole records is refused, never cut; a file that
//! is not a journal is refused; one journal per directory at a time.

mod common;

use std::fs::OpenOptions;
use std::path::Path;

use farthing_payments::Record;
use farthing_store::{Journal, StoreError};
use farthing_store_embedded::FileJournal;

use common::{JournalFile, TempDir, record, records};

/// Opens the journal in `dir` and replays it.
fn open_and_replay(dir: &Path) -> Result<(FileJournal, Vec<Record>), StoreError> {
    let mut journal = FileJournal::open(dir)?;
    let mut seen = Vec::new();
    let count = journal.replay(&mut |record| seen.push(record))?;
    assert_eq!(count, seen.len() as u64, "replay counts what it visits");
    Ok((journal, seen))
}

/// Writes `records` one append each and returns the file offset where each record's frame
/// starts, followed by the end of the file.
fn write_one_per_append(dir: &Path, records: &[Record]) -> Vec<u64> {
    let (mut journal, existing) = open_and_replay(dir).expect("opens");
    assert!(existing.is_empty());
    let mut offsets = vec![journal.len_bytes()];
    for record in records {
        journal
            .append(std::slice::from_ref(record))
            .expect("appends");
        offsets.push(journal.len_bytes());
    }
    offsets
}

fn file_len(path: &Path) -> u64 {
    std::fs::metadata(path).expect("the journal file").len()
}

#[test]
fn records_appended_in_several_commits_come_back_in_order_after_reopening() {
    let dir = TempDir::new("order");
    let all = records(0..9);
    {
        let (mut journal, existing) = open_and_replay(dir.path()).expect("opens");
        assert!(existing.is_empty());
        journal.append(&all[..4]).expect("appends");
        journal.append(&[]).expect("an empty append is fine");
        journal.append(&all[4..5]).expect("appends");
        journal.append(&all[5..]).expect("appends");
        assert_eq!(journal.len_bytes(), file_len(&dir.journal_file()));
    }
    let (journal, replayed) = open_and_replay(dir.path()).expect("reopens");
    assert_eq!(replayed, all);
    assert_eq!(journal.len_bytes(), file_len(&dir.journal_file()));
}

#[test]
fn appending_after_a_reopen_continues_the_file() {
    let dir = TempDir::new("continue");
    let all = records(0..12);
    for chunk in all.chunks(5) {
        let (mut journal, _) = open_and_replay(dir.path()).expect("opens");
        let before = file_len(&dir.journal_file());
        journal.append(chunk).expect("appends");
        assert!(file_len(&dir.journal_file()) > before, "the file grows");
    }
    let (_, replayed) = open_and_replay(dir.path()).expect("reopens");
    assert_eq!(replayed, all);
}

#[test]
#[should_panic(expected = "replay the journal before appending")]
fn appending_before_replaying_is_refused() {
    let dir = TempDir::new("no-replay");
    let mut journal = FileJournal::open(dir.path()).expect("opens");
    let _ = journal.append(&records(0..1));
}

#[test]
fn a_tail_torn_at_any_byte_of_the_last_record_is_cut_and_appends_continue() {
    let dir = TempDir::new("torn");
    let written = records(0..4);
    let offsets = write_one_per_append(dir.path(), &written);
    let intact = std::fs::read(dir.journal_file()).expect("reads");
    let last_start = offsets[3];
    let end = offsets[4];
    for torn_end in last_start + 1..end {
        std::fs::write(dir.journal_file(), &intact[..torn_end as usize]).expect("writes");
        let (mut journal, replayed) = open_and_replay(dir.path()).expect("a torn tail opens");
        assert_eq!(replayed, written[..3], "torn at {torn_end}");
        assert_eq!(file_len(&dir.journal_file()), last_start, "the tail is cut");
        assert_eq!(journal.len_bytes(), last_start);
        journal
            .append(&records(100..101))
            .expect("appends after the cut");
        drop(journal);
        let (_, replayed) = open_and_replay(dir.path()).expect("reopens");
        let mut expected = written[..3].to_vec();
        expected.push(record(100));
        assert_eq!(replayed, expected, "torn at {torn_end}");
    }
}

#[test]
fn garbage_after_the_last_record_is_cut_and_appends_continue() {
    let written = records(0..3);
    let mut patterns: Vec<Vec<u8>> = vec![
        vec![0],
        vec![0; 7],
        vec![0; 8],
        vec![0; 300],
        vec![0xFF; 13],
        b"garbage!".to_vec(),
    ];
    // A frame header whose length runs past the end of the file.
    let mut header = 1_000u32.to_le_bytes().to_vec();
    header.extend_from_slice(&[1, 2, 3, 4, 5, 6]);
    patterns.push(header);
    // Pseudo-random bytes.
    let mut x: u32 = 0x9E37_79B9;
    patterns.push(
        (0..500)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 17;
                x ^= x << 5;
                x as u8
            })
            .collect(),
    );
    for garbage in patterns {
        let dir = TempDir::new("garbage");
        let offsets = write_one_per_append(dir.path(), &written);
        let end = *offsets.last().expect("an end");
        {
            use std::io::Write;
            let mut file = OpenOptions::new()
                .append(true)
                .open(dir.journal_file())
                .expect("opens");
            file.write_all(&garbage).expect("writes");
        }
        let (mut journal, replayed) = open_and_replay(dir.path()).expect("opens");
        assert_eq!(replayed, written, "garbage {garbage:?}");
        assert_eq!(file_len(&dir.journal_file()), end, "the garbage is cut");
        journal.append(&records(50..52)).expect("appends");
        drop(journal);
        let (_, replayed) = open_and_replay(dir.path()).expect("reopens");
        let mut expected = written.clone();
        expected.extend(records(50..52));
        assert_eq!(replayed, expected);
    }
}

#[test]
fn a_flipped_bit_anywhere_in_an_early_record_is_reported_as_corrupt_and_nothing_is_cut() {
    let dir = TempDir::new("flip");
    let written = records(0..5);
    let offsets = write_one_per_append(dir.path(), &written);
    let intact = std::fs::read(dir.journal_file()).expect("reads");
    // The first record and one in the middle, header (length, checksum) and payload alike.
    for damaged in [0usize, 2] {
        for at in offsets[damaged]..offsets[damaged + 1] {
            for bit in 0..8 {
                let mut bytes = intact.clone();
                bytes[at as usize] ^= 1 << bit;
                std::fs::write(dir.journal_file(), &bytes).expect("writes");
                match open_and_replay(dir.path()) {
                    Err(StoreError::Corrupt { .. }) => {}
                    Err(other) => panic!("record {damaged}, byte {at}, bit {bit}: {other}"),
                    Ok((_, replayed)) => panic!(
                        "record {damaged}, byte {at}, bit {bit}: replayed {} records",
                        replayed.len()
                    ),
                }
                assert_eq!(
                    std::fs::read(dir.journal_file()).expect("reads"),
                    bytes,
                    "a refused journal is left as it was"
                );
            }
        }
    }
}

#[test]
fn a_file_that_does_not_start_with_the_magic_is_corrupt_and_left_alone() {
    let mut contents: Vec<Vec<u8>> =
        vec![b"NOTAJRNL and then some bytes".to_vec(), b"FAR".to_vec()];
    // A real journal whose magic lost a bit.
    {
        let dir = TempDir::new("magic-source");
        write_one_per_append(dir.path(), &records(0..2));
        let mut bytes = std::fs::read(dir.journal_file()).expect("reads");
        bytes[0] ^= 0x20;
        contents.push(bytes);
    }
    for content in contents {
        let dir = TempDir::new("magic");
        std::fs::write(dir.journal_file(), &content).expect("writes");
        match open_and_replay(dir.path()) {
            Err(StoreError::Corrupt { offset, .. }) => assert_eq!(offset, 0),
            Err(other) => panic!("{other}"),
            Ok((_, replayed)) => panic!("replayed {} records", replayed.len()),
        }
        assert_eq!(std::fs::read(dir.journal_file()).expect("reads"), content);
    }
}

#[test]
fn a_directory_is_locked_while_its_journal_is_open_and_free_once_it_is_dropped() {
    let dir = TempDir::new("lock");
    let (mut first, _) = open_and_replay(dir.path()).expect("opens");
    first.append(&records(0..2)).expect("appends");
    match FileJournal::open(dir.path()) {
        Err(StoreError::Locked(_)) => {}
        Err(other) => panic!("expected Locked, got {other}"),
        Ok(_) => panic!("a second journal opened the same directory"),
    }
    drop(first);
    let (_, replayed) = open_and_replay(dir.path()).expect("opens once the first is gone");
    assert_eq!(replayed, records(0..2));
}
