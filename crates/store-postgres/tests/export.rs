//! `export` on a fresh PostgreSQL database per test (from `FARTHING_TEST_DATABASE_URL`; without
//! it each test says it was skipped): after a random history applied with `apply_batch` in
//! batches that end only where `batch_may_end_between` allows, the database exports exactly
//! what the in-memory state does, item by item and in the same order; and an export imported
//! back through `apply_batch` in chunks exports the same again.

mod common;

use common::{TestDatabase, database_configured};
use farthing_payments::*;
use farthing_store_postgres::export::{self, chunk_may_end_between, export_all};
use farthing_store_postgres::{apply_batch, batch_may_end_between};
use farthing_testing::{Builder, StepSpec, history};
use proptest::prelude::*;
use proptest::test_runner::TestCaseError;
use tokio_postgres::Client;

/// Histories per run: each gets a database of its own.
const CASES: u32 = 16;

/// `records` in batches of about `size` records, ending only where a batch may end.
fn batches(records: Vec<Record>, size: usize) -> Vec<Vec<Record>> {
    let mut batches: Vec<Vec<Record>> = Vec::new();
    for record in records {
        match batches.last_mut() {
            Some(batch)
                if batch.len() < size
                    || !batch_may_end_between(batch.last().expect("not empty"), &record) =>
            {
                batch.push(record)
            }
            _ => batches.push(vec![record]),
        }
    }
    batches
}

/// Applies every batch to the database and each record to `state`, comparing outcomes.
async fn apply_all(
    client: &mut Client,
    state: &mut State,
    batches: Vec<Vec<Record>>,
) -> Result<(), TestCaseError> {
    for batch in batches {
        let expected: Vec<Outcome> = batch.iter().map(|record| state.apply(record)).collect();
        let got = apply_batch(client, &batch).await;
        prop_assert!(got.is_ok(), "batch {:?} failed: {:?}", batch, got);
        prop_assert_eq!(got.unwrap(), expected, "batch {:?}", batch);
    }
    Ok(())
}

/// The export read through small chunks, so that portals are paged.
async fn export_in_chunks(client: &mut Client, rows: usize) -> Vec<Imported> {
    let snapshot = export::snapshot(client).await.expect("a snapshot");
    let mut all = Vec::new();
    {
        let mut items = snapshot.items();
        loop {
            let chunk = items.next_chunk(rows).await.expect("a chunk");
            assert!(chunk.len() <= rows);
            if chunk.is_empty() {
                break;
            }
            all.extend(chunk);
        }
    }
    snapshot.close().await.expect("close the snapshot");
    all
}

/// Import records of about `size` items, ending only where a chunk may end.
fn import_records(items: &[Imported], size: usize, now: farthing_ledger::Timestamp) -> Vec<Record> {
    let mut chunks: Vec<Vec<Imported>> = Vec::new();
    for item in items {
        match chunks.last_mut() {
            Some(chunk)
                if chunk.len() < size
                    || !chunk_may_end_between(chunk.last().expect("not empty"), item) =>
            {
                chunk.push(item.clone())
            }
            _ => chunks.push(vec![item.clone()]),
        }
    }
    chunks
        .into_iter()
        .map(|chunk| Record {
            now,
            idempotency: None,
            command: Command::Import(chunk),
        })
        .collect()
}

async fn check_history(
    history: &[StepSpec],
    batch_size: usize,
    chunk: usize,
) -> Result<(), TestCaseError> {
    let db = TestDatabase::create("a_database_exports_what_the_state_does")
        .await
        .expect("checked before");
    let mut client = db.migrated().await;
    let mut state = State::new();
    let mut builder = Builder::new();
    let mut records = Vec::new();
    {
        // Records are built against the state as it goes, then applied in batches.
        let mut building = State::new();
        for step in history {
            let record = builder.record(step, &building);
            building.apply(&record);
            records.push(record);
        }
    }
    apply_all(&mut client, &mut state, batches(records, batch_size)).await?;
    let expected: Vec<Imported> = state.export().collect();
    let exported = export_all(&mut client).await.expect("export");
    prop_assert_eq!(exported.len(), expected.len());
    for (index, (got, want)) in exported.iter().zip(&expected).enumerate() {
        prop_assert_eq!(got, want, "item {}", index);
    }
    prop_assert_eq!(&export_in_chunks(&mut client, chunk).await, &expected);

    // The export, imported into another database as a journal of import records would be.
    let copy_db = TestDatabase::create("an_imported_export_exports_the_same")
        .await
        .expect("checked before");
    let mut copy = copy_db.migrated().await;
    let mut copied = State::new();
    let imports = import_records(&expected, chunk, state.last_time());
    apply_all(&mut copy, &mut copied, batches(imports, 2)).await?;
    prop_assert_eq!(&copied.export().collect::<Vec<_>>(), &expected);
    prop_assert_eq!(&export_all(&mut copy).await.expect("export"), &expected);
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(CASES))]

    #[test]
    fn a_database_exports_what_the_in_memory_state_does_and_an_imported_export_the_same(
        history in history(),
        batch_size in 1..6usize,
        chunk in 1..12usize,
    ) {
        if !database_configured("a_database_exports_what_the_in_memory_state_does") {
            return Ok(());
        }
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("a runtime")
            .block_on(check_history(&history, batch_size, chunk))?;
    }
}

#[tokio::test]
async fn an_empty_database_exports_nothing() {
    let Some(db) = TestDatabase::create("an_empty_database_exports_nothing").await else {
        return;
    };
    let mut client = db.migrated().await;
    assert!(export_all(&mut client).await.expect("export").is_empty());
}
