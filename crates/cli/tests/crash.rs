//! Durability: a payment acknowledged with 201 survives `kill -9`; SIGTERM drains and exits 0.

#[macro_use]
mod common;

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::{ADMIN_KEY, Api, Party, Server, TempDir, amount, first_segment, micros};
use serde_json::json;
use tokio::sync::Notify;

const TOPUP: &str = "1000";

/// What the clients saw: every reference sent, and the payments acknowledged with 201.
#[derive(Default, Clone)]
struct Seen {
    sent: HashSet<String>,
    /// reference → (payment id, amount in micro-units)
    acked: HashMap<String, (String, u64)>,
}

/// One round of load: the shared record, and a signal once `enough` payments are acknowledged.
struct Load {
    seen: Arc<Mutex<Seen>>,
    acked: Arc<AtomicUsize>,
    enough: usize,
    notify: Arc<Notify>,
}

impl Load {
    fn new(seen: &Arc<Mutex<Seen>>, enough: usize) -> Load {
        Load {
            seen: seen.clone(),
            acked: Arc::new(AtomicUsize::new(0)),
            enough,
            notify: Arc::new(Notify::new()),
        }
    }

    /// Waits until `enough` payments of this round are acknowledged.
    async fn enough_acknowledged(&self) {
        tokio::time::timeout(Duration::from_secs(30), self.notify.notified())
            .await
            .unwrap_or_else(|_| panic!("{} payments acknowledged within 30 s", self.enough));
    }
}

/// `clients` concurrent clients of one payer, paying until the server stops answering.
fn spawn_clients(
    api: &Api,
    payer: &Party,
    merchant: &Party,
    clients: usize,
    round: usize,
    load: &Load,
) -> Vec<tokio::task::JoinHandle<()>> {
    (0..clients)
        .map(|client| {
            let api = api.clone();
            let payer = payer.clone();
            let merchant = merchant.clone();
            let seen = load.seen.clone();
            let acked = load.acked.clone();
            let notify = load.notify.clone();
            let enough = load.enough;
            tokio::spawn(async move {
                for n in 0.. {
                    let reference = format!("r{round}-c{client}-n{n}");
                    // Amounts vary so that a wrong sum cannot hide.
                    let micros_paid = 1_000 + (client as u64) * 10 + (n % 7);
                    seen.lock().unwrap().sent.insert(reference.clone());
                    let body = json!({
                        "merchant": merchant.id,
                        "amount": amount(micros_paid),
                        "currency": "USD",
                        "reference": reference,
                    });
                    let result = api
                        .try_send(
                            reqwest::Method::POST,
                            "/v1/payments",
                            Some(&payer.key),
                            Some(&body.to_string()),
                            None,
                        )
                        .await;
                    match result {
                        Ok(reply) if reply.status == 201 => {
                            let payment = reply.json();
                            let id = payment["id"].as_str().unwrap().to_string();
                            seen.lock()
                                .unwrap()
                                .acked
                                .insert(reference, (id, micros_paid));
                            if acked.fetch_add(1, Ordering::SeqCst) + 1 == enough {
                                notify.notify_one();
                            }
                        }
                        Ok(reply) => panic!("unexpected HTTP {}: {}", reply.status, reply.body),
                        // The server is gone.
                        Err(_) => return,
                    }
                }
            })
        })
        .collect()
}

/// Checks the restarted server against what the clients saw.
async fn verify(api: &Api, payer: &Party, merchant: &Party, seen: &Seen, topped_up: i128) {
    for (reference, (id, paid)) in &seen.acked {
        let payment = api
            .get(&format!("/v1/payments/{id}"), ADMIN_KEY)
            .await
            .expect(200);
        assert_eq!(payment["amount"], amount(*paid), "acknowledged {reference}");
        assert_eq!(payment["reference"], json!(reference));
    }
    let listed = api.list_all_payments(ADMIN_KEY).await;
    let mut references = HashSet::new();
    let mut spent = 0i128;
    let mut fees = 0i128;
    for payment in &listed {
        let reference = payment["reference"]
            .as_str()
            .expect("reference")
            .to_string();
        assert!(
            seen.sent.contains(&reference),
            "a payment nobody asked for: {payment}"
        );
        assert!(
            references.insert(reference.clone()),
            "paid twice: {reference}"
        );
        if let Some((id, _)) = seen.acked.get(&reference) {
            assert_eq!(payment["id"], json!(id));
        }
        spent += micros(payment["amount"].as_str().unwrap());
        fees += micros(payment["fee"].as_str().unwrap());
    }
    for reference in seen.acked.keys() {
        assert!(
            references.contains(reference),
            "lost acknowledged {reference}"
        );
    }
    let payer_now = micros(&api.payer_usd(payer).await);
    let merchant_now = micros(&api.merchant_usd(merchant).await);
    assert_eq!(
        payer_now,
        topped_up - spent,
        "the payer paid for what exists"
    );
    assert_eq!(
        payer_now + merchant_now + fees,
        topped_up,
        "payer + merchant + fees = money in"
    );
    let statement = api
        .get(
            &format!("/v1/payers/{}/transactions?limit=1", payer.id),
            &payer.key,
        )
        .await
        .expect(200);
    if !listed.is_empty() {
        assert_eq!(statement["data"][0]["id"], listed[0]["id"]);
        assert_eq!(
            micros(statement["data"][0]["running_balance"].as_str().unwrap()),
            payer_now
        );
    }
}

/// Rounds of load on one payer and merchant, each ended by kill -9 mid-stream, then a restart
/// on the same directory (with `flags`) checked against what the clients saw. Returns the
/// server left running and how many payments were acknowledged in all.
async fn kill_9_rounds(
    dir: &std::path::Path,
    flags: &[&str],
    rounds: usize,
    per_round: usize,
) -> (Server, u64) {
    let mut server = Server::start_in(dir, flags);
    let mut api = server.api();
    let merchant = api
        .create_merchant("Shop", Some(175), Some("0.000003"))
        .await;
    let payer = api.create_payer("Ada").await;
    api.topup(&payer, TOPUP).await;
    let seen = Arc::new(Mutex::new(Seen::default()));
    for round in 0..rounds {
        let before = seen.lock().unwrap().acked.len();
        let load = Load::new(&seen, per_round);
        let clients = spawn_clients(&api, &payer, &merchant, 8, round, &load);
        load.enough_acknowledged().await;
        server.kill();
        for client in clients {
            client.await.expect("client task");
        }
        let snapshot = seen.lock().unwrap().clone();
        assert!(snapshot.acked.len() >= before + per_round);

        server = Server::start_in(dir, flags);
        api = server.api();
        verify(&api, &payer, &merchant, &snapshot, micros(TOPUP)).await;
    }
    let acked = seen.lock().unwrap().acked.len() as u64;
    (server, acked)
}

conformance! {
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn every_payment_acknowledged_before_a_kill_9_survives_and_no_money_appears_or_vanishes() {
    let dir = TempDir::new();
    kill_9_rounds(dir.path(), &[], 2, 150).await;
}
}

/// Checkpoints every few dozen payments and journal segments of a few kilobytes: under load,
/// a checkpoint or a removal of segments is under way much of the time.
const BUSY_CHECKPOINTS: &[&str] = &[
    "--checkpoint-rows",
    "90",
    "--journal-segment-bytes",
    "16384",
];

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn payments_acknowledged_survive_kill_9_amid_checkpoints_and_journal_removals() {
    let dir = TempDir::new();
    // Six rounds: each kill lands wherever the checkpoints and removals are.
    let (server, acked) = kill_9_rounds(dir.path(), BUSY_CHECKPOINTS, 6, 120).await;
    assert!(
        first_segment(dir.path()) > 0,
        "checkpoints removed no journal segment"
    );
    assert!(
        server.replayed < acked,
        "a restart replayed {} records of more than {acked}: the checkpoints were not used",
        server.replayed
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_restart_replays_only_the_journal_after_the_last_checkpoint() {
    let dir = TempDir::new();
    let flags = ["--checkpoint-rows", "300"];
    let server = Server::start_in(dir.path(), &flags);
    let api = server.api();
    let merchant = api.create_merchant("Shop", None, None).await;
    let payer = api.create_payer("Ada").await;
    api.topup(&payer, TOPUP).await;
    for _ in 0..400 {
        api.pay(&payer, &merchant, "0.01").await.expect(201);
    }
    drop(server);
    // 403 records were written; a checkpoint every 300 history rows (100 payments) leaves at
    // most that many records to replay.
    let restarted = Server::start_in(dir.path(), &flags);
    assert!(
        restarted.replayed < 120,
        "replayed {} records after checkpoints",
        restarted.replayed
    );
    let api = restarted.api();
    assert_eq!(api.list_all_payments(ADMIN_KEY).await.len(), 400);
    assert_eq!(
        micros(&api.payer_usd(&payer).await),
        micros(TOPUP) - 4_000_000
    );
}

conformance! {
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sigterm_drains_in_flight_payments_exits_0_and_the_data_survives_a_restart() {
    let dir = TempDir::new();
    let mut server = Server::start_in(dir.path(), &[]);
    let api = server.api();
    let merchant = api.create_merchant("Shop", None, None).await;
    let payer = api.create_payer("Ada").await;
    api.topup(&payer, TOPUP).await;
    let seen = Arc::new(Mutex::new(Seen::default()));
    let load = Load::new(&seen, 100);
    let clients = spawn_clients(&api, &payer, &merchant, 8, 0, &load);
    load.enough_acknowledged().await;

    let status = tokio::task::block_in_place(|| server.terminate(Duration::from_secs(20)));
    assert_eq!(
        status.code(),
        Some(0),
        "SIGTERM exits 0; stderr:\n{}",
        server.stderr()
    );
    for client in clients {
        client.await.expect("client task");
    }

    let server = Server::start_in(dir.path(), &[]);
    let api = server.api();
    let seen = seen.lock().unwrap().clone();
    verify(&api, &payer, &merchant, &seen, micros(TOPUP)).await;
    // A clean shutdown finishes what it started: every payment that exists was answered.
    let listed = api.list_all_payments(ADMIN_KEY).await;
    assert_eq!(
        listed.len(),
        seen.acked.len(),
        "no payment was made without an answer"
    );
}
}

conformance! {
#[tokio::test]
async fn sigterm_on_an_idle_server_exits_0_and_everything_is_there_after_a_restart() {
    let dir = TempDir::new();
    let mut server = Server::start_in(dir.path(), &[]);
    let api = server.api();
    let merchant = api.create_merchant("Shop", Some(100), None).await;
    let payer = api.create_payer("Ada").await;
    api.topup(&payer, "5").await;
    let payment = api.pay(&payer, &merchant, "2").await.expect(201);
    let refund = api
        .post(
            &format!("/v1/payments/{}/refunds", payment["id"].as_str().unwrap()),
            &merchant.key,
            &json!({"amount": "0.5"}),
        )
        .await
        .expect(201);
    let statement_before = api
        .get(&format!("/v1/payers/{}/transactions", payer.id), &payer.key)
        .await
        .expect(200);

    let status = server.terminate(Duration::from_secs(20));
    assert_eq!(status.code(), Some(0), "stderr:\n{}", server.stderr());
    // The port is closed.
    assert!(
        api.try_send(reqwest::Method::GET, "/healthz", None, None, None)
            .await
            .is_err()
    );

    let server = Server::start_in(dir.path(), &[]);
    let api = server.api();
    let read = api
        .get(
            &format!("/v1/payments/{}", payment["id"].as_str().unwrap()),
            &payer.key,
        )
        .await
        .expect(200);
    assert_eq!(read["amount_refunded"], "0.50");
    assert_eq!(read["id"], payment["id"]);
    assert_eq!(api.payer_usd(&payer).await, "3.50");
    assert_eq!(api.merchant_usd(&merchant).await, "1.485");
    let statement_after = api
        .get(&format!("/v1/payers/{}/transactions", payer.id), &payer.key)
        .await
        .expect(200);
    assert_eq!(statement_after, statement_before);
    assert_eq!(statement_after["data"][0]["id"], refund["id"]);
    // The keys made before the restart still work, and so does the operator key.
    api.pay(&payer, &merchant, "0.1").await.expect(201);
    api.get(
        &format!("/v1/merchants/{}/balance", merchant.id),
        &merchant.key,
    )
    .await
    .expect(200);
}
}
