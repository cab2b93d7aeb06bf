//! A cache over the engine gives the answers a whole state gives, for random histories with
//! checkpoints written (some while the next record is applied), forgotten rows (all, or the
//! least recently used of some shards), checkpoints cut short after their history step, and
//! restarts (the state in memory lost, the journal's records after the engine's position
//! replayed).

use farthing_payments::{
    CACHE_SHARDS, Command, EntryObject, MerchantId, Outcome, PayerId, PaymentId, Principal, Record,
    State,
};
use farthing_testing::{Builder, StepSpec, TempDir, history};
use proptest::prelude::*;

use super::*;
use crate::Engine;

const CACHE_BYTES: u64 = 8 << 20;

/// What happens after a step.
#[derive(Clone, Copy, Debug)]
enum After {
    Nothing,
    /// The rows changed so far copied for the next checkpoint, as a writer does after each
    /// round.
    Stage,
    /// A checkpoint, written; then memory lets unchanged rows go.
    Checkpoint,
    /// A checkpoint, written, with memory kept.
    CheckpointKeepingMemory,
    /// A checkpoint begun, and written only once the next step is applied (as a writer goes
    /// on while the checkpoint thread writes); then memory lets unchanged rows go.
    CheckpointWhileApplying,
    /// A crash: the state in memory is lost; reopened from the engine and the journal.
    Crash,
    /// A checkpoint whose history step is written, then a crash before its state step.
    CrashMidCheckpoint,
    /// A checkpoint begun, then a crash before anything is written.
    CrashBeforeWriting,
    /// Memory lets go the rows of some shards not used for some rounds (as a writer brings
    /// memory back to its budget a step at a time), unless a checkpoint is being written.
    ForgetSome {
        from: usize,
        shards: usize,
        unused_for: u32,
    },
}

fn after() -> impl Strategy<Value = After> {
    prop_oneof![
        10 => Just(After::Nothing),
        4 => Just(After::Stage),
        3 => Just(After::Checkpoint),
        1 => Just(After::CheckpointKeepingMemory),
        2 => Just(After::CheckpointWhileApplying),
        1 => Just(After::Crash),
        1 => Just(After::CrashMidCheckpoint),
        1 => Just(After::CrashBeforeWriting),
        3 => (0..CACHE_SHARDS, 1..=CACHE_SHARDS, 0u32..3).prop_map(|(from, shards, unused_for)| {
            After::ForgetSome {
                from,
                shards,
                unused_for,
            }
        }),
    ]
}

fn apply(cache: &mut State, record: &Record) -> Outcome {
    cache
        .load_for(std::slice::from_ref(record))
        .expect("the engine reads");
    cache.apply(record)
}

/// Reopens a cache from the engine and replays the journal's records after its position.
fn restart(engine: &Arc<Engine>, journal: &[Record], expected: &[Outcome]) -> State {
    let mut cache = State::cache_over(engine.clone()).expect("the cache opens");
    let from = usize::try_from(cache.records_applied()).expect("fits");
    assert_eq!(from as u64, engine.position());
    for (record, outcome) in journal[from..].iter().zip(&expected[from..]) {
        assert_eq!(&apply(&mut cache, record), outcome, "replaying {record:?}");
    }
    cache
}

/// Every read the API makes, asked of both states.
fn same_answers(whole: &State, cache: &State, builder: &Builder) -> Result<(), TestCaseError> {
    prop_assert_eq!(whole.payment_count(), cache.payment_count());
    prop_assert_eq!(whole.merchant_count(), cache.merchant_count());
    prop_assert_eq!(whole.payer_count(), cache.payer_count());
    prop_assert_eq!(whole.ledger_transfer_count(), cache.ledger_transfer_count());
    prop_assert_eq!(whole.records_applied(), cache.records_applied());
    // Every live hold is in memory, whatever was forgotten or lost: expiry sees each one.
    prop_assert_eq!(whole.live_holds(), cache.live_holds());
    prop_assert_eq!(whole.next_hold_deadline(), cache.next_hold_deadline());
    for key in &builder.key_hashes {
        prop_assert_eq!(whole.principal(key).unwrap(), cache.principal(key).unwrap());
    }
    for id in &builder.payment_ids {
        prop_assert_eq!(whole.payment(*id).unwrap(), cache.payment(*id).unwrap());
        // Rows of every registered kind, from memory or from the engine alike.
        for info in farthing_payments::kinds::KINDS {
            let id = id.to_u128();
            prop_assert_eq!(
                whole.row(info.tag, id).unwrap(),
                cache.row(info.tag, id).unwrap()
            );
        }
    }
    let mut principals = vec![Principal::Operator];
    for payer in builder
        .payer_ids
        .iter()
        .chain([&PayerId::from_u128(u128::MAX)])
    {
        principals.push(Principal::Payer(*payer));
        prop_assert_eq!(
            whole.payer_balances(*payer).unwrap(),
            cache.payer_balances(*payer).unwrap()
        );
        prop_assert_eq!(
            whole.payer_exists(*payer).unwrap(),
            cache.payer_exists(*payer).unwrap()
        );
        // Whole statements, then pages of two walked by cursor.
        prop_assert_eq!(
            whole.payer_entries(*payer, usize::MAX, None).unwrap(),
            cache.payer_entries(*payer, usize::MAX, None).unwrap()
        );
        let mut cursor: Option<EntryObject> = None;
        loop {
            let page = whole.payer_entries(*payer, 2, cursor).unwrap();
            prop_assert_eq!(&page, &cache.payer_entries(*payer, 2, cursor).unwrap());
            match page {
                Some(page) if page.has_more => cursor = page.items.last().map(|e| e.object),
                _ => break,
            }
        }
    }
    for merchant in builder
        .merchant_ids
        .iter()
        .chain([&MerchantId::from_u128(u128::MAX)])
    {
        principals.push(Principal::Merchant(*merchant));
        prop_assert_eq!(
            whole.merchant_balances(*merchant).unwrap(),
            cache.merchant_balances(*merchant).unwrap()
        );
    }
    for principal in principals {
        prop_assert_eq!(
            whole.list_payments(principal, usize::MAX, None).unwrap(),
            cache.list_payments(principal, usize::MAX, None).unwrap()
        );
        let mut cursor: Option<PaymentId> = None;
        loop {
            let page = whole.list_payments(principal, 3, cursor).unwrap();
            prop_assert_eq!(&page, &cache.list_payments(principal, 3, cursor).unwrap());
            match page {
                Some(page) if page.has_more => cursor = page.items.last().map(|p| p.id),
                _ => break,
            }
        }
    }
    Ok(())
}

/// Two whole states export the same items, compared one by one so that a failure names the
/// first that differs.
fn same_export(rebuilt: &State, whole: &State) -> Result<(), TestCaseError> {
    let (got, want): (Vec<_>, Vec<_>) = (rebuilt.export().collect(), whole.export().collect());
    for (index, (got, want)) in got.iter().zip(&want).enumerate() {
        prop_assert_eq!(got, want, "item {}", index);
    }
    prop_assert_eq!(got.len(), want.len());
    Ok(())
}

fn run(steps: &[StepSpec], afters: &[After]) -> Result<(), TestCaseError> {
    let dir = TempDir::new("cache-history");
    let engine = Arc::new(Engine::open(dir.path(), CACHE_BYTES).expect("the engine opens"));
    let checkpoints = EngineCheckpoints::new(engine.clone());
    let mut whole = State::new();
    let mut cache = State::cache_over(engine.clone()).expect("the cache opens");
    let mut builder = Builder::new();
    let mut journal: Vec<Record> = Vec::new();
    let mut expected: Vec<Outcome> = Vec::new();
    // A checkpoint begun before the step just applied, still to be written.
    let mut writing: Option<Checkpoint> = None;
    for (step, after) in steps.iter().zip(afters.iter().cycle()) {
        let record = builder.record(step, &whole);
        let outcome = whole.apply(&record);
        prop_assert_eq!(&apply(&mut cache, &record), &outcome, "{:?}", record);
        journal.push(record);
        expected.push(outcome);
        if let Some(checkpoint) = writing.take() {
            // Reads while it is written come from the frozen rows and what came after.
            same_answers(&whole, &cache, &builder)?;
            checkpoints
                .write(&checkpoint)
                .expect("the checkpoint is written");
            cache.checkpoint_written(checkpoint.position);
            cache.forget_unchanged();
            same_answers(&whole, &cache, &builder)?;
        }
        match after {
            After::Nothing => {}
            After::Stage => cache.stage_changes(),
            After::ForgetSome {
                from,
                shards,
                unused_for,
            } => {
                if writing.is_none() {
                    cache.forget_unused_in(*from..(from + shards).min(CACHE_SHARDS), *unused_for);
                }
            }
            After::CheckpointWhileApplying => writing = Some(cache.freeze()),
            After::Checkpoint | After::CheckpointKeepingMemory => {
                let checkpoint = cache.freeze();
                // Reads while the checkpoint is being written come from the frozen rows.
                same_answers(&whole, &cache, &builder)?;
                checkpoints
                    .write(&checkpoint)
                    .expect("the checkpoint is written");
                cache.checkpoint_written(checkpoint.position);
                if matches!(after, After::Checkpoint) {
                    cache.forget_unchanged();
                }
            }
            After::Crash => cache = restart(&engine, &journal, &expected),
            After::CrashMidCheckpoint => {
                let checkpoint = cache.freeze();
                engine
                    .ingest_history(
                        checkpoint
                            .history_in_key_order()
                            .map(|(key, value)| (key.to_vec(), value))
                            .collect(),
                        checkpoint.position,
                    )
                    .expect("the history step is written");
                cache = restart(&engine, &journal, &expected);
            }
            After::CrashBeforeWriting => {
                let _ = cache.freeze();
                cache = restart(&engine, &journal, &expected);
            }
        }
        same_answers(&whole, &cache, &builder)?;
    }
    if let Some(checkpoint) = writing.take() {
        checkpoints
            .write(&checkpoint)
            .expect("the checkpoint is written");
        cache.checkpoint_written(checkpoint.position);
    }
    // A whole state rebuilt from the engine and the journal after it holds exactly what the
    // whole state does.
    let mut rebuilt = State::whole_from_disk(&*engine).expect("the engine reads whole");
    let from = usize::try_from(rebuilt.records_applied()).expect("fits");
    for (record, outcome) in journal[from..].iter().zip(&expected[from..]) {
        prop_assert_eq!(&rebuilt.apply(record), outcome);
    }
    same_export(&rebuilt, &whole)?;
    same_answers(&whole, &rebuilt, &builder)?;
    // And once more from the engine alone, after a last checkpoint.
    let checkpoint = cache.freeze();
    checkpoints.write(&checkpoint).expect("written");
    let cold = restart(&engine, &journal, &expected);
    same_answers(&whole, &cold, &builder)?;
    let rebuilt = State::whole_from_disk(&*engine).expect("the engine reads whole");
    prop_assert_eq!(rebuilt.records_applied(), whole.records_applied());
    same_export(&rebuilt, &whole)?;
    prop_assert!(
        !journal
            .iter()
            .any(|record| matches!(record.command, Command::Import(_))),
        "histories make no imports"
    );
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]

    #[test]
    fn a_cache_over_the_engine_answers_as_the_whole_state_through_checkpoints_and_crashes(
        steps in history(),
        afters in prop::collection::vec(after(), 1..24),
    ) {
        run(&steps, &afters)?;
    }
}

/// More holds due than two expiries void, in a cache that forgot their payments and was
/// restarted: a batch of two expiries loads what both read, and voids what a whole state does.
#[test]
fn a_batch_of_expiries_over_a_restarted_cache_voids_what_a_whole_state_does() {
    use farthing_ledger::Timestamp;
    let at = |secs: u64| Timestamp(farthing_testing::EPOCH + secs * 1_000_000);
    let record = |now, command| Record {
        now,
        idempotency: None,
        command,
    };
    let (records, _) = farthing_testing::many_holds();
    let dir = TempDir::new("cache-expiries");
    let engine = Arc::new(Engine::open(dir.path(), CACHE_BYTES).expect("the engine opens"));
    let checkpoints = EngineCheckpoints::new(engine.clone());
    let mut whole = State::new();
    let mut cache = State::cache_over(engine.clone()).expect("the cache opens");
    let mut expected = Vec::new();
    for record in &records {
        let outcome = whole.apply(record);
        assert_eq!(apply(&mut cache, record), outcome);
        expected.push(outcome);
    }
    let checkpoint = cache.freeze();
    checkpoints.write(&checkpoint).expect("written");
    cache.checkpoint_written(checkpoint.position);
    cache.forget_unchanged();
    let mut cache = restart(&engine, &records, &expected);
    assert_eq!(cache.live_holds(), whole.live_holds());

    let expire = record(
        at(200),
        Command::from(farthing_payments::HoldCommand::Expire { at: at(200) }),
    );
    let batch = [expire.clone(), expire];
    cache.load_for(&batch).expect("the engine reads");
    for record in &batch {
        assert_eq!(cache.apply(record), whole.apply(record), "a thousand each");
    }
    assert_eq!(cache.live_holds(), 7);
    assert_eq!(cache.next_hold_deadline(), whole.next_hold_deadline());
    let builder = Builder::new();
    same_answers(&whole, &cache, &builder).expect("the same answers");
}

/// Staging stops paying once most of what it copied has changed again (one payer holding
/// again and again), and pays again once a checkpoint begins a new round.
#[test]
fn staging_stops_once_most_staged_rows_change_again_and_starts_again_with_the_next_checkpoint() {
    let (records, _) = farthing_testing::many_holds();
    let dir = TempDir::new("cache-staging");
    let engine = Arc::new(Engine::open(dir.path(), CACHE_BYTES).expect("the engine opens"));
    let mut cache = State::cache_over(engine).expect("the cache opens");
    // The payer, the merchant, the wallet's funding and a first hold.
    let (first, rest) = records.split_at(5);
    for record in first {
        apply(&mut cache, record);
    }
    assert!(cache.changes_unstaged() > 0);
    assert!(cache.staging_pays(), "nothing staged has changed again");
    cache.stage_changes();
    assert_eq!(cache.changes_unstaged(), 0);
    assert!(cache.staging_pays());
    // Every later hold changes the same wallet, merchant account and payer again.
    for record in &rest[..10] {
        apply(&mut cache, record);
    }
    assert!(cache.changes_unstaged() > 0);
    assert!(!cache.staging_pays(), "the same rows changed again");
    let _checkpoint = cache.freeze();
    assert_eq!(cache.changes_unstaged(), 0, "the checkpoint took them");
    assert!(cache.staging_pays(), "a new round");
}

/// Forgetting by use: payers that paid or whose balances were read in the last round stay,
/// whatever their shard; payers unused since they were made go, their wallets and owners
/// with them, and read back from disk as they were; forgetting however recently used lets
/// every row not changed go.
#[test]
fn forgetting_by_use_keeps_the_payers_used_lately_and_lets_the_others_go() {
    use farthing_ledger::{Amount, TransferId};
    use farthing_payments::PayCommand;
    use farthing_testing::{currency, record_at};

    let usd = currency("USD");
    let Shop {
        checkpoints,
        mut cache,
        merchant,
        payers,
        _dir,
        ..
    } = shop("cache-forget-by-use", 300, &["USD"]);
    let checkpoint = |cache: &mut State| {
        let checkpoint = cache.freeze();
        checkpoints
            .write(&checkpoint)
            .expect("the checkpoint is written");
        cache.checkpoint_written(checkpoint.position);
    };

    // The first hundred pay; the second hundred have their balances read; the rest rest.
    for (n, payer) in (0u128..).zip(&payers[..100]) {
        let paid = apply(
            &mut cache,
            &record_at(
                1,
                Command::Pay(PayCommand {
                    id: PaymentId::from_u128(30_000 + n),
                    payer: *payer,
                    merchant,
                    amount: Amount::from_micros(1),
                    currency: usd,
                    description: None,
                    reference: None,
                    transfer_ids: [TransferId(40_000 + 2 * n), TransferId(40_001 + 2 * n)],
                }),
            ),
        );
        assert!(matches!(paid, Outcome::Paid(_)), "{paid:?}");
    }
    for payer in &payers[100..200] {
        let balances = cache.payer_balances(*payer).expect("reads");
        assert_eq!(balances, Some(vec![(usd, 1_000_000)]));
    }
    checkpoint(&mut cache);
    assert!(payers.iter().all(|payer| cache.holds_payer(*payer, usd)));

    // Rows unused for two rounds or more go: the payers untouched since they were made.
    cache.forget_unused_in(0..CACHE_SHARDS, 2);
    for (n, payer) in payers.iter().enumerate() {
        assert_eq!(cache.holds_payer(*payer, usd), n < 200, "payer {n}");
    }
    for payer in &payers[200..] {
        let balances = cache.payer_balances(*payer).expect("reads");
        assert_eq!(
            balances,
            Some(vec![(usd, 1_000_000)]),
            "read back from disk"
        );
    }

    // However recently used: every row not changed since the last checkpoint began goes.
    cache.forget_unused_in(0..CACHE_SHARDS, 0);
    assert!(payers.iter().all(|payer| !cache.holds_payer(*payer, usd)));
    for (n, payer) in payers.iter().enumerate() {
        let expected = if n < 100 { 999_999 } else { 1_000_000 };
        let balances = cache.payer_balances(*payer).expect("reads");
        assert_eq!(balances, Some(vec![(usd, expected)]), "payer {n}");
    }
}

/// A merchant and payers, each topped up with [`WALLET`] in each of some currencies, in a
/// cache over an engine: set up, checkpointed.
struct Shop {
    _dir: TempDir,
    engine: Arc<Engine>,
    checkpoints: EngineCheckpoints,
    cache: State,
    merchant: MerchantId,
    payers: Vec<PayerId>,
}

const WALLET: u64 = 1_000_000;

fn shop(name: &str, payer_count: u128, currencies: &[&str]) -> Shop {
    use farthing_ledger::{Amount, TransferId};
    use farthing_payments::{FeeSchedule, FundingSource, TopupId};
    use farthing_testing::{currency, key_hash, record_at};

    let dir = TempDir::new(name);
    let engine = Arc::new(Engine::open(dir.path(), CACHE_BYTES).expect("the engine opens"));
    let checkpoints = EngineCheckpoints::new(engine.clone());
    let mut cache = State::cache_over(engine.clone()).expect("the cache opens");
    let merchant = MerchantId::from_u128(1);
    let payers: Vec<PayerId> = (0..payer_count)
        .map(|n| PayerId::from_u128(1_000 + n))
        .collect();
    let mut records = vec![record_at(
        0,
        Command::CreateMerchant {
            id: merchant,
            name: "shop".into(),
            key_hash: key_hash(1),
            fee: FeeSchedule {
                bps: 0,
                fixed: Amount::ZERO,
            },
        },
    )];
    for (n, payer) in (0u128..).zip(&payers) {
        records.push(record_at(
            0,
            Command::CreatePayer {
                id: *payer,
                name: format!("payer {n}"),
                key_hash: key_hash(1_000 + n),
            },
        ));
        for (c, code) in (0u128..).zip(currencies) {
            let topup = n * currencies.len() as u128 + c;
            records.push(record_at(
                0,
                Command::Topup {
                    id: TopupId::from_u128(10_000 + topup),
                    payer: *payer,
                    amount: Amount::from_micros(WALLET),
                    currency: currency(code),
                    source: FundingSource::Sandbox,
                    transfer_id: TransferId(20_000 + topup),
                },
            ));
        }
    }
    for record in &records {
        apply(&mut cache, record);
    }
    let checkpoint = cache.freeze();
    checkpoints.write(&checkpoint).expect("written");
    cache.checkpoint_written(checkpoint.position);
    Shop {
        _dir: dir,
        engine,
        checkpoints,
        cache,
        merchant,
        payers,
    }
}

/// A payer's accounts are kept in its row. One whose euro wallet left memory before its row
/// did pays in dollars: its row, written again, still holds the euros, read from disk.
#[test]
fn a_payer_whose_other_wallet_left_memory_keeps_it_in_its_row() {
    use farthing_ledger::{Amount, TransferId};
    use farthing_payments::PayCommand;
    use farthing_testing::{currency, record_at};

    let (usd, eur) = (currency("USD"), currency("EUR"));
    let Shop {
        engine,
        checkpoints,
        mut cache,
        merchant,
        payers,
        _dir,
    } = shop("cache-payer-row", 40, &["USD", "EUR"]);
    // Memory lets rows go a shard at a time, until some payer is held with its dollars but
    // not its euros.
    let mut found = None;
    for shard in 0..CACHE_SHARDS {
        cache.forget_unused_in(shard..shard + 1, 0);
        found = payers
            .iter()
            .find(|payer| cache.holds_payer(**payer, usd) && !cache.holds_payer(**payer, eur));
        if found.is_some() {
            break;
        }
    }
    let payer = *found.expect("some payer's euro wallet goes before its row");
    let paid = apply(
        &mut cache,
        &record_at(
            1,
            Command::Pay(PayCommand {
                id: PaymentId::from_u128(30_000),
                payer,
                merchant,
                amount: Amount::from_micros(1),
                currency: usd,
                description: None,
                reference: None,
                transfer_ids: [TransferId(40_000), TransferId(40_001)],
            }),
        ),
    );
    assert!(matches!(paid, Outcome::Paid(_)), "{paid:?}");
    assert!(
        !cache.holds_payer(payer, eur),
        "paying in dollars reads no euros"
    );
    let checkpoint = cache.freeze();
    checkpoints.write(&checkpoint).expect("written");
    cache.checkpoint_written(checkpoint.position);
    cache.forget_unchanged();
    let expected = Some(vec![(eur, WALLET as i128), (usd, WALLET as i128 - 1)]);
    assert_eq!(cache.payer_balances(payer).expect("reads"), expected);
    let reopened = State::cache_over(engine).expect("reopens");
    assert_eq!(reopened.payer_balances(payer).expect("reads"), expected);
}

/// An engine written in format 1 (a payer's accounts in rows of their own) is brought to
/// format 2 when the store opens it, with the same answers; a cache refuses it before.
#[test]
fn a_state_in_the_first_format_is_upgraded_when_the_store_opens() {
    use farthing_payments::disk::{PayerState, PayerStateV1, state_kind};
    use farthing_testing::currency;

    let Shop {
        engine,
        cache,
        payers,
        _dir,
        ..
    } = shop("cache-upgrade", 40, &["USD", "EUR"]);
    let balances: Vec<_> = payers
        .iter()
        .map(|payer| cache.payer_balances(*payer).expect("reads"))
        .collect();
    drop(cache);

    // Written back as format 1 did: each payer's row without its accounts, which get rows
    // of their own, and no format.
    let mut old = StateChanges::default();
    for entry in engine.state_prefix(&[state_kind::PAYER]) {
        let (key, value) = entry.expect("scans");
        let row: PayerState = disk::decode(&value).expect("decodes");
        for account in row.account_rows() {
            old.put_row(&disk::account_key(account.account.id), &account);
        }
        old.put_row(&key, &PayerStateV1(row));
    }
    old.remove(disk::FORMAT_KEY);
    engine
        .checkpoint_in_order(
            std::iter::empty::<(&[u8], &[u8])>(),
            old.in_key_order(),
            engine.position(),
        )
        .expect("written");
    let refused = State::cache_over(engine.clone()).map(|_| ());
    assert!(
        matches!(&refused, Err(error) if error.0.contains("earlier format")),
        "{refused:?}"
    );

    upgrade(&engine).expect("upgrades");
    let mut payer_accounts = 0;
    for entry in engine.state_prefix(&[state_kind::ACCOUNT]) {
        let row: AccountRow = disk::decode(&entry.expect("scans").1).expect("decodes");
        payer_accounts += usize::from(matches!(row.owner, farthing_payments::Owner::Payer(_)));
    }
    assert_eq!(payer_accounts, 0, "a payer's accounts are in its row only");
    let cache = State::cache_over(engine.clone()).expect("opens once upgraded");
    for (payer, expected) in payers.iter().zip(&balances) {
        assert_eq!(&cache.payer_balances(*payer).expect("reads"), expected);
        assert!(
            expected
                .as_ref()
                .is_some_and(|balances| balances.contains(&(currency("EUR"), WALLET as i128)))
        );
    }
    // A second open finds nothing to do.
    let mut again = StateChanges::default();
    assert!(!disk::upgrade_state(&*engine, &mut again).expect("reads"));
    assert!(again.is_empty());
}
