//! Concurrent payments never overspend a wallet and never lose money.

#[macro_use]
mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use common::{ADMIN_KEY, Server, micros};
use serde_json::json;
use tokio::sync::Barrier;

conformance! {
#[tokio::test(flavor = "multi_thread", worker_threads = 8)]
async fn a_hundred_concurrent_payments_against_a_wallet_for_ten_let_exactly_ten_through() {
    let server = Server::start();
    let api = server.api();
    let merchant = api.create_merchant("Shop", Some(250), None).await;
    let payer = api.create_payer("Ada").await;
    api.topup(&payer, "1").await;

    // While the payments run, the balance is watched: it never goes below zero.
    let done = Arc::new(AtomicBool::new(false));
    let watcher = {
        let api = api.clone();
        let payer = payer.clone();
        let done = done.clone();
        tokio::spawn(async move {
            let mut seen = Vec::new();
            while !done.load(Ordering::Relaxed) {
                seen.push(micros(&api.payer_usd(&payer).await));
            }
            seen
        })
    };

    let barrier = Arc::new(Barrier::new(100));
    let tasks: Vec<_> = (0..100)
        .map(|n| {
            let api = api.clone();
            let key = payer.key.clone();
            let body = json!({
                "merchant": merchant.id,
                "amount": "0.1",
                "currency": "USD",
                "reference": format!("r-{n}"),
            });
            let barrier = barrier.clone();
            tokio::spawn(async move {
                barrier.wait().await;
                api.post("/v1/payments", &key, &body).await
            })
        })
        .collect();
    let mut succeeded = Vec::new();
    let mut refused = 0;
    for task in tasks {
        let reply = task.await.expect("task");
        match reply.status {
            201 => succeeded.push(reply.json()),
            402 => {
                reply.expect_problem(402, "insufficient_funds");
                refused += 1;
            }
            other => panic!("unexpected HTTP {other}: {}", reply.body),
        }
    }
    done.store(true, Ordering::Relaxed);
    let seen = watcher.await.expect("watcher");

    assert_eq!(succeeded.len(), 10, "exactly ten payments fit");
    assert_eq!(refused, 90);
    assert!(!seen.is_empty());
    for balance in &seen {
        assert!(
            (0..=1_000_000).contains(balance),
            "balance {balance} µ out of range"
        );
    }
    assert_eq!(api.payer_usd(&payer).await, "0.00");
    // 10 × (0.10 − 0.0025 fee)
    assert_eq!(api.merchant_usd(&merchant).await, "0.975");
    let listed = api.list_all_payments(&payer.key).await;
    assert_eq!(listed.len(), 10);
    let mut listed_ids: Vec<&str> = listed.iter().map(|p| p["id"].as_str().unwrap()).collect();
    let mut acked_ids: Vec<&str> = succeeded
        .iter()
        .map(|p| p["id"].as_str().unwrap())
        .collect();
    listed_ids.sort_unstable();
    acked_ids.sort_unstable();
    assert_eq!(listed_ids, acked_ids);
}
}

conformance! {
#[tokio::test(flavor = "multi_thread", worker_threads = 8)]
async fn many_payers_paying_one_merchant_at_once_lose_no_money() {
    let server = Server::start();
    let api = server.api();
    // 0.013 pays floor(0.013 × 333 / 10000) + 0.000007 = 0.000439 in fees.
    let merchant = api
        .create_merchant("Shop", Some(333), Some("0.000007"))
        .await;
    let mut payers = Vec::new();
    for n in 0..10 {
        let payer = api.create_payer(&format!("p{n}")).await;
        api.topup(&payer, "0.2").await;
        payers.push(payer);
    }
    let barrier = Arc::new(Barrier::new(200));
    let mut tasks = Vec::new();
    for payer in &payers {
        for _ in 0..20 {
            let api = api.clone();
            let key = payer.key.clone();
            let body = json!({"merchant": merchant.id, "amount": "0.013", "currency": "USD"});
            let barrier = barrier.clone();
            tasks.push(tokio::spawn(async move {
                barrier.wait().await;
                api.post("/v1/payments", &key, &body).await.status
            }));
        }
    }
    let mut statuses = Vec::new();
    for task in tasks {
        statuses.push(task.await.expect("task"));
    }
    // 0.2 / 0.013 = 15 payments each fit, 5 do not.
    assert_eq!(statuses.iter().filter(|&&s| s == 201).count(), 150);
    assert_eq!(statuses.iter().filter(|&&s| s == 402).count(), 50);
    for payer in &payers {
        assert_eq!(api.payer_usd(payer).await, "0.005");
    }
    assert_eq!(
        micros(&api.merchant_usd(&merchant).await),
        150 * (13_000 - 439)
    );
    let all = api.list_all_payments(ADMIN_KEY).await;
    assert_eq!(all.len(), 150);
    let fees: i128 = all.iter().map(|p| micros(p["fee"].as_str().unwrap())).sum();
    assert_eq!(fees, 150 * 439);
}
}
