//! Holds over HTTP on both backends: a payment made with `"capture_method": "manual"` holds
//! its amount until its merchant captures it (all or part), cancels it, or lets it expire; the
//! money follows each step, the statement shows a capture as it happens, and holds outlive a
//! restart and are settled by whichever server comes first.

#[macro_use]
mod common;

use common::{ADMIN_KEY, Api, Backend, Party, Server, TempDir, micros};
use serde_json::{Value, json};

async fn authorize(api: &Api, payer: &Party, merchant: &Party, amount: &str, secs: u64) -> Value {
    api.post(
        "/v1/payments",
        &payer.key,
        &json!({
            "merchant": merchant.id,
            "amount": amount,
            "currency": "USD",
            "capture_method": "manual",
            "hold_seconds": secs,
        }),
    )
    .await
    .expect(201)
}

fn id(value: &Value) -> &str {
    value["id"].as_str().expect("an id")
}

async fn advance(api: &Api, secs: u64) {
    api.post(
        "/v1/test_clock",
        ADMIN_KEY,
        &json!({ "advance_seconds": secs }),
    )
    .await
    .expect(200);
}

async fn payer_micros(api: &Api, payer: &Party) -> i128 {
    micros(&api.payer_usd(payer).await)
}

async fn merchant_micros(api: &Api, merchant: &Party) -> i128 {
    micros(&api.merchant_usd(merchant).await)
}

/// The payer's statement, newest first: `(id, amount, running balance)` per line.
async fn statement(api: &Api, payer: &Party) -> Vec<(String, i128, i128)> {
    let page = api
        .get(
            &format!("/v1/payers/{}/transactions?limit=100", payer.id),
            &payer.key,
        )
        .await
        .expect(200);
    page["data"]
        .as_array()
        .expect("data")
        .iter()
        .map(|line| {
            (
                line["id"].as_str().expect("id").to_string(),
                micros(line["amount"].as_str().expect("amount")),
                micros(line["running_balance"].as_str().expect("balance")),
            )
        })
        .collect()
}

const UNIT: i128 = 1_000_000;

conformance! {
#[tokio::test]
async fn a_hold_is_captured_in_part_canceled_or_expires_and_the_money_follows_each_step() {
    let server = Server::start_with(&["--test-clock"]);
    let api = server.api();
    // 1% fee.
    let merchant = api.create_merchant("Shop", Some(100), None).await;
    let other = api.create_merchant("Other", None, None).await;
    let payer = api.create_payer("Ada").await;
    api.topup(&payer, "10").await;

    // Authorized: the amount leaves what the payer may spend, and reaches no one yet.
    let held = authorize(&api, &payer, &merchant, "4", 3600).await;
    assert_eq!(held["status"], "requires_capture", "{held}");
    assert_eq!(held["capture_method"], "manual");
    assert_eq!(micros(held["amount_authorized"].as_str().unwrap()), 4 * UNIT);
    let created = held["created_at"].as_u64().unwrap();
    let before = held["capture_before"].as_u64().unwrap();
    assert!((3599..=3601).contains(&(before - created)), "{held}");
    assert_eq!(payer_micros(&api, &payer).await, 6 * UNIT);
    assert_eq!(merchant_micros(&api, &merchant).await, 0);
    assert_eq!(statement(&api, &payer).await.len(), 1, "only the top-up moved money");
    let path = format!("/v1/payments/{}", id(&held));
    for key in [&payer.key, &merchant.key, &ADMIN_KEY.to_string()] {
        let seen = api.get(&path, key).await.expect(200);
        assert_eq!(seen["status"], "requires_capture");
    }
    // The payer lists it among its payments, the merchant too.
    let listed = api.get("/v1/payments", &payer.key).await.expect(200);
    assert_eq!(listed["data"][0]["id"], held["id"]);
    let listed = api.get("/v1/payments", &merchant.key).await.expect(200);
    assert_eq!(listed["data"][0]["status"], "requires_capture");

    // Only its merchant and the operator settle it; nothing moved, so nothing refunds.
    let capture = format!("{path}/capture");
    api.post(&capture, &payer.key, &json!({})).await.expect_problem(404, "not_found");
    api.post(&capture, &other.key, &json!({})).await.expect_problem(404, "not_found");
    api.post(&format!("{path}/refunds"), &merchant.key, &json!({}))
        .await
        .expect_problem(409, "payment_not_captured");
    api.post(&capture, &merchant.key, &json!({"amount": "4.000001"}))
        .await
        .expect_problem(422, "capture_exceeds_authorization");

    // Captured in part, once: the fee on what was captured, the rest back to the wallet.
    let body = json!({"amount": "3"});
    let captured = api
        .post_idempotent(&capture, &merchant.key, &body, "capture-1")
        .await
        .expect(200);
    assert_eq!(captured["status"], "succeeded", "{captured}");
    assert_eq!(micros(captured["amount"].as_str().unwrap()), 3 * UNIT);
    assert_eq!(micros(captured["fee"].as_str().unwrap()), 30_000);
    assert_eq!(micros(captured["net"].as_str().unwrap()), 3 * UNIT - 30_000);
    assert_eq!(micros(captured["amount_authorized"].as_str().unwrap()), 4 * UNIT);
    assert!(captured["captured_at"].as_u64().is_some(), "{captured}");
    assert!(captured.get("capture_before").is_none(), "{captured}");
    let replay = api
        .post_idempotent(&capture, &merchant.key, &body, "capture-1")
        .await;
    assert_eq!(replay.header("idempotent-replayed"), Some("true"));
    assert_eq!(replay.expect(200), captured);
    api.post(&capture, &merchant.key, &json!({}))
        .await
        .expect_problem(409, "payment_not_held");
    api.post_raw(&format!("{path}/cancel"), &merchant.key, "")
        .await
        .expect_problem(409, "payment_not_held");
    assert_eq!(payer_micros(&api, &payer).await, 7 * UNIT);
    assert_eq!(merchant_micros(&api, &merchant).await, 3 * UNIT - 30_000);
    // The capture is a line of the statement, newest, for what was captured.
    let lines = statement(&api, &payer).await;
    assert_eq!(lines[0], (id(&held).to_string(), 3 * UNIT, 7 * UNIT), "{lines:?}");
    assert_eq!(api.get(&path, &payer.key).await.expect(200), captured);
    // A captured payment refunds like any other.
    api.post(&format!("{path}/refunds"), &merchant.key, &json!({"amount": "1"}))
        .await
        .expect(201);
    assert_eq!(payer_micros(&api, &payer).await, 8 * UNIT);

    // Canceled: all of it back.
    let second = authorize(&api, &payer, &merchant, "2", 3600).await;
    assert_eq!(payer_micros(&api, &payer).await, 6 * UNIT);
    let canceled = api
        .post_raw(&format!("/v1/payments/{}/cancel", id(&second)), ADMIN_KEY, "")
        .await
        .expect(200);
    assert_eq!(canceled["status"], "canceled");
    assert_eq!(canceled["cancellation_reason"], "requested");
    assert!(canceled["canceled_at"].as_u64().is_some());
    assert_eq!(payer_micros(&api, &payer).await, 8 * UNIT);

    // Expired: not captured in time, all of it back, and too late to capture.
    let third = authorize(&api, &payer, &merchant, "5", 60).await;
    let fourth = authorize(&api, &payer, &merchant, "1", 7200).await;
    assert_eq!(payer_micros(&api, &payer).await, 2 * UNIT);
    advance(&api, 61).await;
    let expired = api
        .get(&format!("/v1/payments/{}", id(&third)), &merchant.key)
        .await
        .expect(200);
    assert_eq!(expired["status"], "canceled", "{expired}");
    assert_eq!(expired["cancellation_reason"], "expired");
    api.post(&format!("/v1/payments/{}/capture", id(&third)), &merchant.key, &json!({}))
        .await
        .expect_problem(409, "payment_not_held");
    assert_eq!(payer_micros(&api, &payer).await, 7 * UNIT);
    // The longer hold is still live, and captures in full by default.
    let whole = api
        .post_raw(&format!("/v1/payments/{}/capture", id(&fourth)), &merchant.key, "")
        .await
        .expect(200);
    assert_eq!(micros(whole["amount"].as_str().unwrap()), UNIT);
    assert_eq!(payer_micros(&api, &payer).await, 7 * UNIT);
    // The statement reconciles: every line's balance follows from the one before it.
    let lines = statement(&api, &payer).await;
    assert_eq!(lines.len(), 4, "top-up, two captures and a refund: {lines:?}");
    assert_eq!(lines[0].2, 7 * UNIT);
}

#[tokio::test]
async fn holds_outlive_a_restart_and_are_captured_or_expire_after_it() {
    let dir = TempDir::new();
    // Checkpoints every few records, so that what restarts comes from the engine too.
    let flags = ["--test-clock", "--checkpoint-rows", "3"];
    let mut server = Server::start_in(dir.path(), &flags);
    let api = server.api();
    let merchant = api.create_merchant("Shop", None, None).await;
    let payer = api.create_payer("Ada").await;
    api.topup(&payer, "10").await;
    let kept = authorize(&api, &payer, &merchant, "3", 3600).await;
    let lapsing = authorize(&api, &payer, &merchant, "2", 600).await;
    for _ in 0..6 {
        api.pay(&payer, &merchant, "0.1").await.expect(201);
    }
    server.kill();
    let server = Server::start_in(dir.path(), &flags);
    let api = server.api();
    assert_eq!(payer_micros(&api, &payer).await, 44 * UNIT / 10, "both holds still held");
    let seen = api
        .get(&format!("/v1/payments/{}", id(&lapsing)), &payer.key)
        .await
        .expect(200);
    assert_eq!(seen["status"], "requires_capture");
    advance(&api, 601).await;
    let expired = api
        .get(&format!("/v1/payments/{}", id(&lapsing)), &payer.key)
        .await
        .expect(200);
    assert_eq!(expired["cancellation_reason"], "expired", "{expired}");
    api.post(&format!("/v1/payments/{}/capture", id(&kept)), &merchant.key, &json!({}))
        .await
        .expect(200);
    assert_eq!(payer_micros(&api, &payer).await, 64 * UNIT / 10);
    assert_eq!(merchant_micros(&api, &merchant).await, 36 * UNIT / 10);
}
}

/// Two servers on one database: a hold placed through one is captured through the other,
/// one capture and one cancel racing for the same hold settle it once, and expiry happens
/// once, whichever server's clock reaches the deadline first.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn holds_are_settled_once_across_two_servers() {
    if !Backend::Postgres.enter() {
        common::skipped("holds_are_settled_once_across_two_servers");
        return;
    }
    let dir = TempDir::new();
    let first = Server::start_in(dir.path(), &["--test-clock"]);
    let second = Server::start_in(dir.path(), &["--test-clock"]);
    let (one, two) = (first.api(), second.api());
    let merchant = one.create_merchant("Shop", None, None).await;
    let payer = one.create_payer("Ada").await;
    one.topup(&payer, "100").await;

    let held = authorize(&one, &payer, &merchant, "10", 3600).await;
    let captured = two
        .post(
            &format!("/v1/payments/{}/capture", id(&held)),
            &merchant.key,
            &json!({}),
        )
        .await
        .expect(200);
    assert_eq!(captured["status"], "succeeded");

    // Capture on one server, cancel on the other, at once, twenty times over.
    let mut raced = Vec::new();
    for _ in 0..20 {
        raced.push(authorize(&one, &payer, &merchant, "1", 3600).await);
    }
    let mut tasks = Vec::new();
    for payment in &raced {
        let (one, two, key) = (one.clone(), two.clone(), merchant.key.clone());
        let path = format!("/v1/payments/{}", id(payment));
        tasks.push(tokio::spawn(async move {
            let (capture_path, cancel_path, empty) = (
                format!("{path}/capture"),
                format!("{path}/cancel"),
                json!({}),
            );
            let capture = one.post(&capture_path, &key, &empty);
            let cancel = two.post_raw(&cancel_path, &key, "");
            let (capture, cancel) = tokio::join!(capture, cancel);
            (capture.status, cancel.status)
        }));
    }
    let mut captures = 0;
    for task in tasks {
        let (capture, cancel) = task.await.unwrap();
        assert!(
            (capture, cancel) == (200, 409) || (capture, cancel) == (409, 200),
            "exactly one settles the hold: capture {capture}, cancel {cancel}\n{}\n{}",
            first.stderr(),
            second.stderr()
        );
        captures += usize::from(capture == 200);
    }
    let captured_micros = i128::try_from(captures).unwrap() * UNIT;
    assert_eq!(
        payer_micros(&two, &payer).await,
        90 * UNIT - captured_micros
    );
    assert_eq!(
        merchant_micros(&one, &merchant).await,
        10 * UNIT + captured_micros
    );

    // Expiry: the clock moved through one server; either may expire it, once.
    let lapsing = authorize(&two, &payer, &merchant, "5", 60).await;
    advance(&one, 61).await;
    for api in [&one, &two] {
        let seen = api
            .get(&format!("/v1/payments/{}", id(&lapsing)), &payer.key)
            .await
            .expect(200);
        assert_eq!(seen["cancellation_reason"], "expired", "{seen}");
    }
    assert_eq!(
        payer_micros(&one, &payer).await,
        90 * UNIT - captured_micros
    );
}
