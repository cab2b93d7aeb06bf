//! `farthing backup`: a consistent, verified copy of a running embedded installation.

mod common;

use std::collections::HashSet;
use std::process::Command;
use std::sync::{Arc, Mutex};

use common::{ADMIN_KEY, Server, TempDir, micros};

const SMALL_CHECKPOINTS: &[&str] = &["--checkpoint-rows", "60", "--journal-segment-bytes", "8192"];

fn backup(from: &std::path::Path, to: &std::path::Path) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_farthing"))
        .args(["backup", "--data-dir"])
        .arg(from)
        .arg("--to")
        .arg(to)
        .env_remove("FARTHING_DATA_DIR")
        .output()
        .expect("run farthing backup")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backup_taken_during_a_stream_of_payments_is_a_consistent_state_that_serves() {
    let source = TempDir::new();
    let copy = TempDir::new();
    let copy_dir = copy.path().join("copy");
    // Checkpoints every few payments, and small journal segments, so that the engine holds
    // most of the history and the journal before it has been removed when the backup runs.
    let server = Server::start_in(source.path(), SMALL_CHECKPOINTS);
    let api = server.api();
    let merchant = api.create_merchant("Shop", Some(250), None).await;
    let payer = api.create_payer("Ada").await;
    api.topup(&payer, "100").await;

    // Four clients pay without pause and record every payment acknowledged.
    let acknowledged = Arc::new(Mutex::new(Vec::<String>::new()));
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut clients = Vec::new();
    for _ in 0..4 {
        let (api, payer, merchant) = (api.clone(), payer.clone(), merchant.clone());
        let (acknowledged, stop) = (acknowledged.clone(), stop.clone());
        clients.push(tokio::spawn(async move {
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let reply = api.pay(&payer, &merchant, "0.01").await;
                let id = reply.expect(201)["id"].as_str().unwrap().to_string();
                acknowledged.lock().unwrap().push(id);
            }
        }));
    }
    while acknowledged.lock().unwrap().len() < 400 {
        tokio::time::sleep(std::time::Duration::from_millis(5)).await;
    }
    let before: HashSet<String> = acknowledged.lock().unwrap().iter().cloned().collect();
    let (source_dir, target) = (source.path().to_path_buf(), copy_dir.clone());
    let output = tokio::task::spawn_blocking(move || backup(&source_dir, &target))
        .await
        .unwrap();
    assert!(
        output.status.success(),
        "backup failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(String::from_utf8_lossy(&output.stdout).contains("every currency balances"));
    let after: HashSet<String> = acknowledged.lock().unwrap().iter().cloned().collect();
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    for client in clients {
        client.await.unwrap();
    }
    // Checkpoints removed the journal's first segments: the backup had to copy the engine.
    assert!(
        common::first_segment(source.path()) > 0,
        "no segment was removed"
    );
    drop(server);

    // The copy serves on its own: it holds every payment acknowledged before the backup began,
    // nothing that was not acknowledged by the time it ended, and its money adds up.
    let restored = Server::start_in(&copy_dir, &[]);
    let api = restored.api();
    let payments = api.list_all_payments(ADMIN_KEY).await;
    let ids: HashSet<String> = payments
        .iter()
        .map(|p| p["id"].as_str().unwrap().to_string())
        .collect();
    assert!(
        before.is_subset(&ids),
        "a payment acknowledged before the backup is missing"
    );
    assert!(
        ids.is_subset(&after),
        "the copy holds a payment nobody was told about"
    );
    let spent: i128 = payments
        .iter()
        .map(|p| micros(p["amount"].as_str().unwrap()))
        .sum();
    assert_eq!(micros(&api.payer_usd(&payer).await), 100_000_000 - spent);
    let net: i128 = payments
        .iter()
        .map(|p| micros(p["net"].as_str().unwrap()))
        .sum();
    assert_eq!(micros(&api.merchant_usd(&merchant).await), net);
}

#[test]
fn a_backup_refuses_to_overwrite_an_existing_journal() {
    let source = TempDir::new();
    {
        let server = Server::start_in(source.path(), &[]);
        drop(server);
    }
    let target = TempDir::new();
    let first = backup(source.path(), target.path());
    assert!(
        first.status.success(),
        "{}",
        String::from_utf8_lossy(&first.stderr)
    );
    let second = backup(source.path(), target.path());
    assert!(
        !second.status.success(),
        "a second backup into the same place must fail"
    );
    assert!(String::from_utf8_lossy(&second.stderr).contains("already holds a journal"));
}
