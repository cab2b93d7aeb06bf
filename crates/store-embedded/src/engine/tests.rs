//! The engine: what a checkpoint writes reads back, before and after a reopen; a checkpoint
//! stopped after its history step leaves the old state and position, and written again gives
//! the new ones; random sequences of checkpoints and such stops agree with a model.

use std::collections::BTreeMap;

use farthing_testing::TempDir;
use proptest::prelude::*;

use super::*;

const CACHE_BYTES: u64 = 8 << 20;
const CASES: u32 = 32;

fn open(dir: &TempDir) -> Engine {
    Engine::open(dir.path(), CACHE_BYTES).expect("the engine opens")
}

fn row(key: &[u8], value: &[u8]) -> (Vec<u8>, Vec<u8>) {
    (key.to_vec(), value.to_vec())
}

fn put(key: &[u8], value: &[u8]) -> StateChange {
    (key.to_vec(), Some(value.to_vec()))
}

fn remove(key: &[u8]) -> StateChange {
    (key.to_vec(), None)
}

fn all_history(engine: &Engine) -> Vec<(Vec<u8>, Vec<u8>)> {
    engine
        .history_prefix(&[])
        .collect::<Result<_, _>>()
        .expect("history reads")
}

fn all_state(engine: &Engine) -> Vec<(Vec<u8>, Vec<u8>)> {
    engine
        .state_prefix(&[])
        .collect::<Result<_, _>>()
        .expect("state reads")
}

/// Bytes that are not zero in fjall's own journal files (`*.jnl`, in the engine's directory).
/// fjall makes each one 64 MiB of zeros when it creates it (and cuts it to what it holds when
/// it opens it again), so their length says nothing; what was written does.
fn fjall_journal_bytes_written(dir: &Path) -> usize {
    let mut journals = 0;
    let mut written = 0;
    for entry in std::fs::read_dir(dir).expect("the engine's directory") {
        let path = entry.expect("an entry").path();
        if path.extension().is_some_and(|extension| extension == "jnl") {
            journals += 1;
            let bytes = std::fs::read(&path).expect("a journal file");
            written += bytes.iter().filter(|&&byte| byte != 0).count();
        }
    }
    assert!(
        journals > 0,
        "fjall keeps its journal in the engine's directory"
    );
    written
}

#[test]
fn a_new_engine_is_at_position_zero_and_holds_nothing() {
    let dir = TempDir::new("new");
    let engine = open(&dir);
    assert_eq!(engine.position(), 0);
    assert_eq!(engine.history(b"p1").expect("reads"), None);
    assert_eq!(engine.state(b"a1").expect("reads"), None);
    assert!(all_history(&engine).is_empty());
    assert!(all_state(&engine).is_empty());
}

#[test]
fn rows_and_entries_a_checkpoint_writes_read_back_by_key_and_by_prefix() {
    let dir = TempDir::new("round-trip");
    let engine = open(&dir);
    engine
        .checkpoint(
            vec![
                row(b"p\x02", b"second payment"),
                row(b"p\x01", b"first payment"),
                row(b"s\x01", b""),
            ],
            vec![
                put(b"acct\x07", b"balance 7"),
                put(b"acct\x03", b"balance 3"),
                put(b"key\xfe\xff", &[0xFF; 300]),
            ],
            3,
        )
        .expect("checkpoints");
    assert_eq!(engine.position(), 3);
    assert_eq!(
        engine.history(b"p\x01").expect("reads").as_deref(),
        Some(&b"first payment"[..])
    );
    assert_eq!(
        engine.history(b"s\x01").expect("reads").as_deref(),
        Some(&b""[..])
    );
    assert_eq!(engine.history(b"p\x03").expect("reads"), None);
    assert_eq!(
        engine.state(b"key\xfe\xff").expect("reads"),
        Some(vec![0xFF; 300])
    );
    assert_eq!(
        engine
            .history_prefix(b"p")
            .collect::<Result<Vec<_>, _>>()
            .expect("reads"),
        vec![
            row(b"p\x01", b"first payment"),
            row(b"p\x02", b"second payment")
        ]
    );
    assert_eq!(
        engine
            .state_prefix(b"acct")
            .collect::<Result<Vec<_>, _>>()
            .expect("reads"),
        vec![
            row(b"acct\x03", b"balance 3"),
            row(b"acct\x07", b"balance 7")
        ]
    );
}

#[test]
fn the_position_and_what_it_reflects_persist_across_a_reopen() {
    let dir = TempDir::new("reopen");
    {
        let engine = open(&dir);
        engine
            .checkpoint(vec![row(b"p1", b"one")], vec![put(b"a1", b"ten")], 5)
            .expect("checkpoints");
        engine
            .checkpoint(vec![row(b"p2", b"two")], vec![put(b"a1", b"eleven")], 9)
            .expect("checkpoints");
    }
    let engine = open(&dir);
    assert_eq!(engine.position(), 9);
    assert_eq!(
        all_history(&engine),
        vec![row(b"p1", b"one"), row(b"p2", b"two")]
    );
    assert_eq!(all_state(&engine), vec![row(b"a1", b"eleven")]);
}

#[test]
fn a_checkpoint_stopped_after_its_history_step_keeps_the_old_position_and_state_and_can_be_written_again()
 {
    let dir = TempDir::new("interrupted");
    {
        let engine = open(&dir);
        engine
            .checkpoint(vec![row(b"p1", b"one")], vec![put(b"a1", b"old")], 4)
            .expect("checkpoints");
        // The process stops between the two ingestions of the checkpoint at position 7.
        engine
            .ingest_history(vec![row(b"p2", b"two")], 7)
            .expect("the history step");
    }
    {
        let engine = open(&dir);
        assert_eq!(engine.position(), 4, "the position did not move");
        assert_eq!(all_state(&engine), vec![row(b"a1", b"old")]);
        // Rows of records after the position read as absent: replaying those records makes
        // them again, and would take a row of its own for a collision.
        assert_eq!(engine.history(b"p2").expect("reads"), None);
        assert_eq!(all_history(&engine), vec![row(b"p1", b"one")]);
        engine
            .checkpoint(
                vec![row(b"p2", b"two")],
                vec![put(b"a1", b"new"), put(b"a2", b"made")],
                7,
            )
            .expect("the checkpoint again");
    }
    let engine = open(&dir);
    assert_eq!(engine.position(), 7);
    assert_eq!(
        all_history(&engine),
        vec![row(b"p1", b"one"), row(b"p2", b"two")]
    );
    assert_eq!(
        all_state(&engine),
        vec![row(b"a1", b"new"), row(b"a2", b"made")]
    );
}

#[test]
fn a_removed_state_entry_stays_removed_over_the_older_tables_that_hold_it() {
    let dir = TempDir::new("remove");
    {
        let engine = open(&dir);
        engine
            .checkpoint(
                Vec::new(),
                vec![put(b"a1", b"one"), put(b"a2", b"two"), put(b"a3", b"three")],
                1,
            )
            .expect("checkpoints");
        engine
            .checkpoint(Vec::new(), vec![remove(b"a2"), remove(b"never there")], 2)
            .expect("checkpoints");
        assert_eq!(engine.state(b"a2").expect("reads"), None);
    }
    let engine = open(&dir);
    assert_eq!(engine.state(b"a2").expect("reads"), None);
    assert_eq!(
        all_state(&engine),
        vec![row(b"a1", b"one"), row(b"a3", b"three")]
    );
    // Put back, it is there again.
    engine
        .checkpoint(Vec::new(), vec![put(b"a2", b"back")], 3)
        .expect("checkpoints");
    assert_eq!(
        engine.state(b"a2").expect("reads").as_deref(),
        Some(&b"back"[..])
    );
}

#[test]
fn history_ingested_again_over_the_same_keys_reads_the_same_bytes() {
    let dir = TempDir::new("reingest");
    let rows: Vec<_> = (0u32..500)
        .map(|n| (n.to_be_bytes().to_vec(), format!("row {n}").into_bytes()))
        .collect();
    {
        let engine = open(&dir);
        engine
            .checkpoint(rows.clone(), Vec::new(), 500)
            .expect("checkpoints");
        // A replay after a crash rewrites an overlapping part of the same rows.
        engine
            .checkpoint(rows[200..].to_vec(), Vec::new(), 500)
            .expect("checkpoints");
        assert_eq!(all_history(&engine), rows);
    }
    let engine = open(&dir);
    engine
        .checkpoint(rows[..300].to_vec(), Vec::new(), 500)
        .expect("checkpoints");
    assert_eq!(all_history(&engine), rows);
    for (key, value) in &rows {
        assert_eq!(engine.history(key).expect("reads").as_ref(), Some(value));
    }
}

#[test]
fn a_key_given_twice_in_one_checkpoint_keeps_the_value_given_last() {
    let dir = TempDir::new("duplicates");
    let engine = open(&dir);
    engine
        .checkpoint(
            vec![
                row(b"p1", b"first"),
                row(b"p2", b"only"),
                row(b"p1", b"second"),
                row(b"p1", b"third"),
            ],
            vec![
                put(b"a1", b"kept?"),
                remove(b"a1"),
                remove(b"a2"),
                put(b"a2", b"put after its removal"),
            ],
            1,
        )
        .expect("checkpoints");
    assert_eq!(
        all_history(&engine),
        vec![row(b"p1", b"third"), row(b"p2", b"only")]
    );
    assert_eq!(
        all_state(&engine),
        vec![row(b"a2", b"put after its removal")]
    );
}

#[test]
fn an_empty_checkpoint_moves_only_the_position() {
    let dir = TempDir::new("empty");
    {
        let engine = open(&dir);
        engine
            .checkpoint(vec![row(b"p1", b"one")], vec![put(b"a1", b"one")], 1)
            .expect("checkpoints");
        engine
            .checkpoint(Vec::new(), Vec::new(), 6)
            .expect("an empty checkpoint");
        assert_eq!(engine.position(), 6);
    }
    let engine = open(&dir);
    assert_eq!(engine.position(), 6);
    assert_eq!(all_history(&engine), vec![row(b"p1", b"one")]);
    assert_eq!(all_state(&engine), vec![row(b"a1", b"one")]);
}

#[test]
fn the_position_is_never_among_the_state_entries() {
    let dir = TempDir::new("position-hidden");
    let engine = open(&dir);
    engine
        .checkpoint(
            Vec::new(),
            vec![put(b"\xfe", b"highest key a caller may use")],
            2,
        )
        .expect("checkpoints");
    assert_eq!(
        all_state(&engine),
        vec![row(b"\xfe", b"highest key a caller may use")]
    );
}

#[test]
#[should_panic(expected = "state keys never start with 0xFF")]
fn a_state_key_starting_with_the_engines_own_byte_is_refused() {
    let dir = TempDir::new("reserved");
    let engine = open(&dir);
    let _ = engine.checkpoint(Vec::new(), vec![put(b"\xff\x01", b"")], 1);
}

#[test]
#[should_panic(expected = "state changes come in strictly increasing key order")]
fn state_changes_out_of_order_are_refused() {
    let dir = TempDir::new("state-order");
    let engine = open(&dir);
    let changes: [(&[u8], Option<&[u8]>); 2] = [(b"a2", Some(b"two")), (b"a1", Some(b"one"))];
    let _ = engine.checkpoint_in_order(Vec::<(Vec<u8>, Vec<u8>)>::new(), changes, 1);
}

#[test]
#[should_panic(expected = "state changes come in strictly increasing key order")]
fn a_state_key_given_twice_in_order_is_refused() {
    let dir = TempDir::new("state-twice");
    let engine = open(&dir);
    let changes: [(&[u8], Option<&[u8]>); 2] = [(b"a1", Some(b"one")), (b"a1", None)];
    let _ = engine.checkpoint_in_order(Vec::<(Vec<u8>, Vec<u8>)>::new(), changes, 1);
}

#[test]
#[should_panic(expected = "a checkpoint never goes back")]
fn a_checkpoint_behind_the_engines_position_is_refused() {
    let dir = TempDir::new("backwards");
    let engine = open(&dir);
    engine
        .checkpoint(Vec::new(), Vec::new(), 10)
        .expect("checkpoints");
    let _ = engine.checkpoint(Vec::new(), Vec::new(), 9);
}

#[test]
fn a_second_engine_on_the_same_directory_is_refused_until_the_first_is_dropped() {
    let dir = TempDir::new("lock");
    let first = open(&dir);
    match Engine::open(dir.path(), CACHE_BYTES) {
        Err(StoreError::Locked(_)) => {}
        Err(other) => panic!("expected Locked, got {other}"),
        Ok(_) => panic!("two engines opened one directory"),
    }
    drop(first);
    open(&dir);
}

#[test]
fn checkpoints_write_nothing_to_fjalls_journal_so_a_reopen_replays_nothing() {
    let dir = TempDir::new("no-fjall-journal");
    let engine = open(&dir);
    assert_eq!(fjall_journal_bytes_written(dir.path()), 0);
    for n in 0u64..60 {
        let history = (0..50u64)
            .map(|i| ((n * 50 + i).to_be_bytes().to_vec(), vec![n as u8; 100]))
            .collect();
        let state = (0..20u64)
            .map(|i| (i.to_be_bytes().to_vec(), Some(n.to_be_bytes().to_vec())))
            .collect();
        engine
            .checkpoint(history, state, n + 1)
            .expect("checkpoints");
    }
    assert_eq!(fjall_journal_bytes_written(dir.path()), 0);
    drop(engine);
    let engine = open(&dir);
    assert_eq!(engine.position(), 60);
    assert_eq!(fjall_journal_bytes_written(dir.path()), 0);
    assert_eq!(all_history(&engine).len(), 60 * 50);
}

// =============================================================================================
// Random checkpoints against a model
// =============================================================================================

#[derive(Clone, Debug)]
enum Step {
    Checkpoint {
        history: Vec<(Vec<u8>, Vec<u8>)>,
        state: Vec<StateChange>,
        /// Records the checkpoint covers: its position is the last one's plus these.
        records: u64,
        /// The process stops after the history step; the engine is opened again.
        stopped_after_history: bool,
    },
    Reopen,
}

/// Keys from a small set, so that checkpoints overlap and repeat keys; some start with 0xFE,
/// next to the engine's own byte.
fn any_key() -> impl Strategy<Value = Vec<u8>> {
    (prop::sample::select(vec![0x00u8, b'a', 0xFE]), 0u8..6).prop_map(|(first, n)| vec![first, n])
}

fn any_value() -> impl Strategy<Value = Vec<u8>> {
    prop::collection::vec(any::<u8>(), 0..24)
}

fn any_step() -> impl Strategy<Value = Step> {
    prop_oneof![
        5 => (
            prop::collection::vec((any_key(), any_value()), 0..8),
            prop::collection::vec((any_key(), prop::option::of(any_value())), 0..8),
            0u64..4,
            prop::bool::weighted(0.3),
        )
            .prop_map(|(history, state, records, stopped_after_history)| Step::Checkpoint {
                history,
                state,
                records,
                stopped_after_history,
            }),
        1 => Just(Step::Reopen),
    ]
}

/// What the engine must hold: the committed state and position, and every history row
/// ingested (a stopped checkpoint's rows included), the newest ingestion of a key winning.
#[derive(Default)]
struct Model {
    /// Each row with the position of the checkpoint that wrote it last: visible once the
    /// engine's position reaches it.
    history: BTreeMap<Vec<u8>, (Vec<u8>, u64)>,
    state: BTreeMap<Vec<u8>, Vec<u8>>,
    position: u64,
}

fn check(engine: &Engine, model: &Model) -> Result<(), TestCaseError> {
    prop_assert_eq!(engine.position(), model.position);
    let history: BTreeMap<_, _> = all_history(engine).into_iter().collect();
    let visible: BTreeMap<Vec<u8>, Vec<u8>> = model
        .history
        .iter()
        .filter(|(_, (_, stamp))| *stamp <= model.position)
        .map(|(key, (value, _))| (key.clone(), value.clone()))
        .collect();
    prop_assert_eq!(&history, &visible);
    let state: BTreeMap<_, _> = all_state(engine).into_iter().collect();
    prop_assert_eq!(&state, &model.state);
    for first in [0x00u8, b'a', 0xFE] {
        for n in 0u8..6 {
            let key = [first, n];
            prop_assert_eq!(
                engine.history(&key).expect("reads"),
                visible.get(&key[..]).cloned()
            );
            prop_assert_eq!(
                engine.state(&key).expect("reads"),
                model.state.get(&key[..]).cloned()
            );
        }
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(CASES))]

    #[test]
    fn random_checkpoints_stopped_or_not_after_their_history_step_hold_what_was_committed(
        steps in prop::collection::vec(any_step(), 1..12)
    ) {
        let dir = TempDir::new("model");
        let mut engine = open(&dir);
        let mut model = Model::default();
        for step in steps {
            match step {
                Step::Checkpoint { history, state, records, stopped_after_history } => {
                    let stamp = model.position + records;
                    for (key, value) in &history {
                        model.history.insert(key.clone(), (value.clone(), stamp));
                    }
                    if stopped_after_history {
                        engine.ingest_history(history, stamp).expect("the history step");
                        drop(engine);
                        engine = open(&dir);
                    } else {
                        for (key, change) in &state {
                            match change {
                                Some(value) => model.state.insert(key.clone(), value.clone()),
                                None => model.state.remove(key),
                            };
                        }
                        model.position += records;
                        engine
                            .checkpoint(history, state, model.position)
                            .expect("checkpoints");
                    }
                }
                Step::Reopen => {
                    drop(engine);
                    engine = open(&dir);
                }
            }
            check(&engine, &model)?;
        }
    }
}
