//! Several `farthing serve` processes on one PostgreSQL database: concurrent payments never
//! overspend, one idempotency key charges once whichever servers receive it, a server killed
//! mid-stream loses nothing it acknowledged, a database stopped mid-stream gives clear 503s,
//! loses nothing acknowledged, and is reconnected to by itself when it returns, and a fact
//! one server changes is acted on at once by the others.
//!
//! Each test needs `FARTHING_TEST_DATABASE_URL` and says it was skipped without it. The outage
//! test runs a PostgreSQL server of its own (the machine's `initdb` and `pg_ctl`), so that
//! stopping it disturbs no other test.

#[macro_use]
mod common;

use std::collections::{HashMap, HashSet};

use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::private_postgres::PrivatePostgres;
use common::{Api, Backend, Party, Server, TempDir, amount, micros};
use serde_json::{Value, json};
use tokio::sync::Barrier;

/// Two servers on one fresh database, or `None` (after saying so) without PostgreSQL.
fn two_servers(test: &str) -> Option<(TempDir, Server, Server)> {
    if !Backend::Postgres.enter() {
        common::skipped(test);
        return None;
    }
    let dir = TempDir::new();
    let first = Server::start_in(dir.path(), &[]);
    let second = Server::start_in(dir.path(), &[]);
    Some((dir, first, second))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 8)]
async fn two_servers_take_a_thousand_concurrent_payments_without_overdraft_or_lost_money() {
    let Some((_dir, first, second)) = two_servers("two_servers_take_a_thousand_payments") else {
        return;
    };
    let apis = [first.api(), second.api()];
    let merchant = apis[0].create_merchant("Arcade", Some(250), None).await;
    // Ten hot wallets of 1.00 each; every payment is 0.10, so ten fit in each wallet, and a
    // hundred are sent per wallet, half to each server.
    let mut payers = Vec::new();
    for n in 0..10 {
        let payer = apis[n % 2].create_payer(&format!("Player {n}")).await;
        apis[0].topup(&payer, "1").await;
        payers.push(payer);
    }
    let barrier = Arc::new(Barrier::new(1_000));
    let tasks: Vec<_> = (0..1_000)
        .map(|n| {
            let api = apis[n % 2].clone();
            let payer = payers[(n / 2) % 10].clone();
            let body = json!({
                "merchant": merchant.id,
                "amount": "0.1",
                "currency": "USD",
                "reference": format!("r-{n}"),
            });
            let barrier = barrier.clone();
            tokio::spawn(async move {
                barrier.wait().await;
                (
                    payer.id.clone(),
                    api.post("/v1/payments", &payer.key, &body).await,
                )
            })
        })
        .collect();
    let mut succeeded: HashMap<String, usize> = HashMap::new();
    let mut ids = HashSet::new();
    for task in tasks {
        let (payer, reply) = task.await.expect("task");
        match reply.status {
            201 => {
                *succeeded.entry(payer).or_default() += 1;
                assert!(ids.insert(reply.json()["id"].as_str().unwrap().to_string()));
            }
            402 => {
                reply.expect_problem(402, "insufficient_funds");
            }
            other => panic!("unexpected HTTP {other}: {}", reply.body),
        }
    }
    for payer in &payers {
        assert_eq!(succeeded.get(&payer.id), Some(&10), "{}", payer.id);
        for api in &apis {
            assert_eq!(api.payer_usd(payer).await, "0.00");
        }
    }
    // 100 payments of 0.10, less 2.5% each: the merchant has 9.75, and the fees (0.25) sit in
    // the operator's revenue account. Both servers read the same.
    for api in &apis {
        assert_eq!(api.merchant_usd(&merchant).await, "9.75");
        assert_eq!(api.list_all_payments(&merchant.key).await.len(), 100);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 8)]
async fn one_idempotency_key_sent_to_both_servers_at_once_charges_once() {
    let Some((_dir, first, second)) = two_servers("one_idempotency_key_to_both_servers") else {
        return;
    };
    let apis = [first.api(), second.api()];
    let merchant = apis[0].create_merchant("News", None, None).await;
    let payer = apis[1].create_payer("Reader").await;
    apis[0].topup(&payer, "10").await;
    // Many keys, each sent by several clients to both servers at the same moment.
    const KEYS: usize = 20;
    const SENDS: usize = 6;
    let barrier = Arc::new(Barrier::new(KEYS * SENDS));
    let body = json!({"merchant": merchant.id, "amount": "0.25", "currency": "USD"});
    let tasks: Vec<_> = (0..KEYS * SENDS)
        .map(|n| {
            let api = apis[n % 2].clone();
            let key = payer.key.clone();
            let body = body.clone();
            let idempotency_key = format!("article-{}", n / SENDS);
            let barrier = barrier.clone();
            tokio::spawn(async move {
                barrier.wait().await;
                let reply = api
                    .post_idempotent("/v1/payments", &key, &body, &idempotency_key)
                    .await;
                (idempotency_key, reply)
            })
        })
        .collect();
    let mut by_key: HashMap<String, HashSet<String>> = HashMap::new();
    for task in tasks {
        let (idempotency_key, reply) = task.await.expect("task");
        let payment = reply.expect(201);
        by_key
            .entry(idempotency_key)
            .or_default()
            .insert(payment["id"].as_str().unwrap().to_string());
    }
    assert_eq!(by_key.len(), KEYS);
    for (key, ids) in &by_key {
        assert_eq!(ids.len(), 1, "{key} answered with payments {ids:?}");
    }
    for api in &apis {
        assert_eq!(
            api.payer_usd(&payer).await,
            amount(10_000_000 - KEYS as u64 * 250_000)
        );
        assert_eq!(api.list_all_payments(&payer.key).await.len(), KEYS);
    }
}

/// What a stream of payments saw: acknowledged payments by id with their amounts, and the
/// answers that were not 201.
#[derive(Default)]
struct Stream {
    acked: HashMap<String, u64>,
    unavailable: usize,
    /// Answers other than 201 and 503 `storage_unavailable`, or connections that failed.
    other: Vec<String>,
}

/// `clients` tasks paying `merchant` from `payer`'s wallet, each amount distinct, until `stop`.
fn stream(
    apis: Vec<Api>,
    payer: &Party,
    merchant: &Party,
    clients: usize,
    stop: &Arc<AtomicBool>,
    seen: &Arc<Mutex<Stream>>,
    acked: &Arc<AtomicUsize>,
) -> Vec<tokio::task::JoinHandle<()>> {
    (0..clients)
        .map(|client| {
            let api = apis[client % apis.len()].clone();
            let (payer, merchant) = (payer.clone(), merchant.clone());
            let (stop, seen, acked) = (stop.clone(), seen.clone(), acked.clone());
            tokio::spawn(async move {
                let mut n = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    n += 1;
                    let micros_sent = 1_000 + (client as u64) * 7 + n % 5;
                    let body = json!({
                        "merchant": merchant.id,
                        "amount": amount(micros_sent),
                        "currency": "USD",
                        "reference": format!("c{client}-{n}"),
                    });
                    match api
                        .try_send(
                            reqwest::Method::POST,
                            "/v1/payments",
                            Some(&payer.key),
                            Some(&body.to_string()),
                            None,
                        )
                        .await
                    {
                        Ok(reply) if reply.status == 201 => {
                            let id = reply.json()["id"].as_str().unwrap().to_string();
                            seen.lock().unwrap().acked.insert(id, micros_sent);
                            acked.fetch_add(1, Ordering::Relaxed);
                        }
                        Ok(reply) if reply.status == 503 => {
                            reply.expect_problem(503, "storage_unavailable");
                            seen.lock().unwrap().unavailable += 1;
                            tokio::time::sleep(Duration::from_millis(20)).await;
                        }
                        Ok(reply) => seen
                            .lock()
                            .unwrap()
                            .other
                            .push(format!("HTTP {}: {}", reply.status, reply.body)),
                        // A killed server's clients see their connections fail: they stop.
                        Err(error) => {
                            seen.lock()
                                .unwrap()
                                .other
                                .push(format!("no answer: {error}"));
                            return;
                        }
                    }
                }
            })
        })
        .collect()
}

/// Waits until `count` is at least `target`.
async fn wait_for(count: &AtomicUsize, target: usize, what: &str) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while count.load(Ordering::Relaxed) < target {
        assert!(Instant::now() < deadline, "{what}: {target} within 60 s");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// Every acknowledged payment is there, and the wallet and the merchant account for exactly
/// the payments that exist (acknowledged or not: one whose answer was lost may exist too).
async fn assert_nothing_acknowledged_was_lost(
    api: &Api,
    payer: &Party,
    merchant: &Party,
    acked: &HashMap<String, u64>,
    topped_up: u64,
) {
    let listed = api.list_all_payments(&merchant.key).await;
    let listed: HashMap<String, Value> = listed
        .into_iter()
        .map(|payment| (payment["id"].as_str().unwrap().to_string(), payment))
        .collect();
    for (id, micros_sent) in acked {
        let payment = listed
            .get(id)
            .unwrap_or_else(|| panic!("acknowledged payment {id} is missing"));
        assert_eq!(
            micros(payment["amount"].as_str().unwrap()),
            *micros_sent as i128
        );
    }
    let spent: i128 = listed
        .values()
        .map(|payment| micros(payment["amount"].as_str().unwrap()))
        .sum();
    assert_eq!(
        micros(&api.payer_usd(payer).await),
        topped_up as i128 - spent
    );
    assert_eq!(micros(&api.merchant_usd(merchant).await), spent);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 8)]
async fn a_server_killed_mid_stream_loses_nothing_it_acknowledged_and_the_other_goes_on() {
    let Some((_dir, mut first, second)) = two_servers("a_server_killed_mid_stream") else {
        return;
    };
    let (api_first, api_second) = (first.api(), second.api());
    let merchant = api_second.create_merchant("Tips", None, None).await;
    let payer = api_second.create_payer("Fan").await;
    api_second.topup(&payer, "1000").await;

    let stop = Arc::new(AtomicBool::new(false));
    let seen = Arc::new(Mutex::new(Stream::default()));
    let acked = Arc::new(AtomicUsize::new(0));
    let killed_side = stream(vec![api_first], &payer, &merchant, 8, &stop, &seen, &acked);
    let living_side = stream(
        vec![api_second.clone()],
        &payer,
        &merchant,
        8,
        &stop,
        &seen,
        &acked,
    );
    wait_for(&acked, 300, "payments acknowledged before the kill").await;
    first.kill();
    let at_kill = acked.load(Ordering::Relaxed);
    wait_for(
        &acked,
        at_kill + 300,
        "payments acknowledged after the kill",
    )
    .await;
    stop.store(true, Ordering::Relaxed);
    for task in killed_side.into_iter().chain(living_side) {
        task.await.expect("client");
    }
    let seen = std::mem::take(&mut *seen.lock().unwrap());
    assert!(
        seen.other.iter().all(|line| line.starts_with("no answer")),
        "{:?}",
        seen.other
    );
    assert_nothing_acknowledged_was_lost(
        &api_second,
        &payer,
        &merchant,
        &seen.acked,
        1_000_000_000,
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 8)]
async fn postgresql_stopped_mid_stream_gives_503s_loses_nothing_and_the_servers_recover_alone() {
    if common::test_database_url().is_none() {
        common::skipped("postgresql_stopped_mid_stream");
        return;
    }
    let postgres = tokio::task::block_in_place(PrivatePostgres::start);
    common::admin_sql(
        &postgres.url("postgres"),
        vec!["CREATE DATABASE farthing".to_string()],
    )
    .expect("create the database");
    let url = postgres.url("farthing");
    let dir = TempDir::new();
    let first = Server::start_in(dir.path(), &["--database-url", &url]);
    let second = Server::start_in(dir.path(), &["--database-url", &url]);
    let apis = vec![first.api(), second.api()];
    let merchant = apis[0].create_merchant("Fares", None, None).await;
    let payer = apis[1].create_payer("Rider").await;
    apis[0].topup(&payer, "1000").await;

    let stop = Arc::new(AtomicBool::new(false));
    let seen = Arc::new(Mutex::new(Stream::default()));
    let acked = Arc::new(AtomicUsize::new(0));
    let clients = stream(apis.clone(), &payer, &merchant, 16, &stop, &seen, &acked);
    wait_for(&acked, 300, "payments acknowledged before the stop").await;

    tokio::task::block_in_place(|| postgres.stop_immediately());
    let stopped_at = acked.load(Ordering::Relaxed);
    // While the database is down: requests fail fast with 503, and so does the health check.
    let unavailable_before = seen.lock().unwrap().unavailable;
    let deadline = Instant::now() + Duration::from_secs(30);
    while seen.lock().unwrap().unavailable < unavailable_before + 50 {
        assert!(Instant::now() < deadline, "503s while PostgreSQL is down");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    for api in &apis {
        let started = Instant::now();
        let health = api.get_anonymous("/healthz").await;
        health.expect_problem(503, "storage_unavailable");
        assert!(started.elapsed() < Duration::from_secs(5), "a fast 503");
    }
    // Nothing new is acknowledged while it is down (a payment committed just before the stop
    // may still be answered).
    let during = acked.load(Ordering::Relaxed);
    assert!(
        during <= stopped_at + 16,
        "{during} acknowledged after {stopped_at}"
    );

    tokio::task::block_in_place(|| postgres.start_again());
    // The servers reconnect by themselves: payments succeed again on both.
    wait_for(
        &acked,
        during + 300,
        "payments acknowledged after the restart",
    )
    .await;
    for api in &apis {
        let deadline = Instant::now() + Duration::from_secs(30);
        while api.get_anonymous("/healthz").await.status != 200 {
            assert!(Instant::now() < deadline, "healthy again within 30 s");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    stop.store(true, Ordering::Relaxed);
    for task in clients {
        task.await.expect("client");
    }
    let seen = std::mem::take(&mut *seen.lock().unwrap());
    assert!(seen.other.is_empty(), "{:?}", seen.other);
    assert!(seen.unavailable >= 50);
    for api in &apis {
        assert_nothing_acknowledged_was_lost(api, &payer, &merchant, &seen.acked, 1_000_000_000)
            .await;
    }
    drop((first, second));
}

#[test]
fn a_server_on_a_database_without_an_operator_key_refuses_to_make_one_up() {
    if !Backend::Postgres.enter() {
        common::skipped("a_server_on_a_database_without_an_operator_key");
        return;
    }
    let dir = TempDir::new();
    let url = dir.database_url().expect("a database").to_string();
    let output = Command::new(env!("CARGO_BIN_EXE_farthing"))
        .args(["serve", "--listen", "127.0.0.1:0", "--database-url", &url])
        .env_remove("FARTHING_ADMIN_KEY")
        .output()
        .expect("run farthing serve");
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("FARTHING_ADMIN_KEY") && stderr.contains("every server"),
        "{stderr}"
    );
    // With the key, the same database serves; afterwards a server may start without it.
    let with_key = Server::start_in(dir.path(), &[]);
    drop(with_key);
    let mut command = Command::new(env!("CARGO_BIN_EXE_farthing"));
    command
        .args(["serve", "--listen", "127.0.0.1:0", "--database-url", &url])
        .env_remove("FARTHING_ADMIN_KEY")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped());
    let mut child = command.spawn().expect("spawn farthing serve");
    let mut line = String::new();
    std::io::BufRead::read_line(
        &mut std::io::BufReader::new(child.stdout.take().unwrap()),
        &mut line,
    )
    .unwrap();
    let _ = child.kill();
    let _ = child.wait();
    assert!(line.contains("listening on http://"), "{line}");
}

#[tokio::test]
async fn metrics_count_batches_by_how_their_accounts_were_read() {
    if !Backend::Postgres.enter() {
        common::skipped("metrics_count_batches_by_how_their_accounts_were_read");
        return;
    }
    let dir = TempDir::new();
    let server = Server::start_in(dir.path(), &[]);
    let api = server.api();
    let merchant = api.create_merchant("Shop", None, None).await;
    let payer = api.create_payer("Ada").await;
    api.topup(&payer, "1").await;
    for _ in 0..4 {
        api.pay(&payer, &merchant, "0.1").await.expect(201);
    }
    let metrics = api.get("/metrics", common::ADMIN_KEY).await;
    assert_eq!(metrics.status, 200);
    let sample = |name: &str| -> u64 {
        metrics
            .body
            .lines()
            .find_map(|line| line.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
            .unwrap_or_else(|| panic!("no {name} in\n{}", metrics.body))
    };
    let foreseen = sample("farthing_pg_batches_total{path=\"foreseen\"}");
    let locked_first = sample("farthing_pg_batches_total{path=\"locked_first\"}");
    // Every batch that made an account locked first (the wallet, the merchant's and fee
    // accounts); payments between accounts the server knows were worked out from its forecast.
    assert!(locked_first >= 1, "{}", metrics.body);
    assert!(foreseen >= 3, "{}", metrics.body);
    assert_eq!(
        foreseen + locked_first,
        sample("farthing_journal_commits_total"),
        "every committed batch is counted once"
    );
    // One server alone: nothing else changes its accounts, and nothing conflicts.
    assert_eq!(sample("farthing_pg_forecast_wrong_total"), 0);
    assert_eq!(sample("farthing_pg_batch_conflicts_total"), 0);
}

/// The operator's key is a fact about parties that can change: a server started with another
/// admin key replaces it in the database. A server that has just accepted the old key must
/// refuse it from then on, and accept the new one, with nothing cached in between.
#[tokio::test]
async fn a_replaced_operator_key_is_refused_at_once_by_a_server_that_accepted_it() {
    let Some((dir, first, _second)) = two_servers("a_replaced_operator_key_is_refused_at_once")
    else {
        return;
    };
    let api = first.api();
    let merchant = api.create_merchant("Kiosk", None, None).await;
    api.get("/v1/payments", &merchant.key).await.expect(200);
    api.get("/v1/payments", common::ADMIN_KEY).await.expect(200);
    let new_key = "a-replacement-operator-key-0123456789abcdef-0123456789";
    let _third = Server::start_in_as(dir.path(), &[], new_key);
    api.get("/v1/payments", common::ADMIN_KEY)
        .await
        .expect_problem(401, "unauthorized");
    api.get("/v1/payments", new_key).await.expect(200);
    // A merchant's key never changes: the server goes on accepting it.
    api.get("/v1/payments", &merchant.key).await.expect(200);
}
