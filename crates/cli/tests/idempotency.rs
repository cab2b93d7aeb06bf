//! `Idempotency-Key`: replays, conflicts, scoping, and concurrency.

#[macro_use]
mod common;

use common::{ADMIN_KEY, Server, TempDir};
use serde_json::json;

conformance! {
#[tokio::test]
async fn the_same_key_and_body_replays_the_first_response_byte_for_byte_and_charges_once() {
    let server = Server::start();
    let api = server.api();
    let merchant = api.create_merchant("Shop", Some(200), None).await;
    let payer = api.create_payer("Ada").await;
    api.topup(&payer, "10").await;
    let body =
        json!({"merchant": merchant.id, "amount": "1.25", "currency": "USD", "reference": "o-1"});

    let first = api
        .post_idempotent("/v1/payments", &payer.key, &body, "pay-once")
        .await;
    first.expect(201);
    assert_eq!(first.header("idempotent-replayed"), None);
    for _ in 0..3 {
        let again = api
            .post_idempotent("/v1/payments", &payer.key, &body, "pay-once")
            .await;
        assert_eq!(again.status, 201);
        assert_eq!(again.body, first.body, "the replay is byte-identical");
        assert_eq!(again.content_type(), first.content_type());
        assert_eq!(again.header("idempotent-replayed"), Some("true"));
    }
    assert_eq!(api.payer_usd(&payer).await, "8.75");
    assert_eq!(api.merchant_usd(&merchant).await, "1.225");
    let listed = api.list_all_payments(&payer.key).await;
    assert_eq!(listed.len(), 1);
    assert_eq!(listed[0], first.json());
}
}

conformance! {
#[tokio::test]
async fn topups_merchants_refunds_and_batches_replay_under_the_same_key_too() {
    let server = Server::start();
    let api = server.api();
    let payer = api.create_payer("Ada").await;

    let topup = json!({"amount": "5", "currency": "USD", "source": "sandbox"});
    let path = format!("/v1/payers/{}/topups", payer.id);
    let first = api.post_idempotent(&path, &payer.key, &topup, "t").await;
    let second = api.post_idempotent(&path, &payer.key, &topup, "t").await;
    first.expect(201);
    assert_eq!((second.status, &second.body), (201, &first.body));
    assert_eq!(api.payer_usd(&payer).await, "5.00");

    let merchant_body = json!({"name": "Shop", "fee_bps": 100});
    let m1 = api
        .post_idempotent("/v1/merchants", ADMIN_KEY, &merchant_body, "m")
        .await;
    let m2 = api
        .post_idempotent("/v1/merchants", ADMIN_KEY, &merchant_body, "m")
        .await;
    let merchant = common::party(&m1.expect(201));
    assert_eq!(m2.status, 201);
    assert_eq!(m2.body, m1.body, "the same merchant and key come back");

    let payment = api.pay(&payer, &merchant, "2").await.expect(201);
    let refunds = format!("/v1/payments/{}/refunds", payment["id"].as_str().unwrap());
    let half = json!({"amount": "1"});
    let r1 = api
        .post_idempotent(&refunds, &merchant.key, &half, "r")
        .await;
    let r2 = api
        .post_idempotent(&refunds, &merchant.key, &half, "r")
        .await;
    r1.expect(201);
    assert_eq!((r2.status, &r2.body), (201, &r1.body));
    assert_eq!(api.payer_usd(&payer).await, "4.00", "refunded once");

    let batch = json!({"payments": [
        {"payer": payer.id, "merchant": merchant.id, "amount": "1", "currency": "USD"},
        {"payer": payer.id, "merchant": merchant.id, "amount": "100", "currency": "USD"},
    ]});
    let b1 = api
        .post_idempotent("/v1/payments/batch", ADMIN_KEY, &batch, "b")
        .await;
    let b2 = api
        .post_idempotent("/v1/payments/batch", ADMIN_KEY, &batch, "b")
        .await;
    b1.expect(200);
    assert_eq!((b2.status, &b2.body), (200, &b1.body));
    assert_eq!(api.payer_usd(&payer).await, "3.00", "the batch ran once");
}
}

conformance! {
#[tokio::test]
async fn the_same_key_with_a_different_body_or_route_is_422_idempotency_key_reused() {
    let server = Server::start();
    let api = server.api();
    let merchant = api.create_merchant("Shop", None, None).await;
    let payer = api.create_payer("Ada").await;
    api.topup(&payer, "10").await;
    let body = json!({"merchant": merchant.id, "amount": "1", "currency": "USD"});
    api.post_idempotent("/v1/payments", &payer.key, &body, "k")
        .await
        .expect(201);
    for other in [
        json!({"merchant": merchant.id, "amount": "1.5", "currency": "USD"}),
        json!({"merchant": merchant.id, "amount": "1", "currency": "USD", "reference": "x"}),
    ] {
        api.post_idempotent("/v1/payments", &payer.key, &other, "k")
            .await
            .expect_problem(422, "idempotency_key_reused");
    }
    // The same key on another route is another request.
    api.post_idempotent(
        &format!("/v1/payers/{}/topups", payer.id),
        &payer.key,
        &json!({"amount": "1", "currency": "USD", "source": "sandbox"}),
        "k",
    )
    .await
    .expect_problem(422, "idempotency_key_reused");
    assert_eq!(api.payer_usd(&payer).await, "9.00");
    assert_eq!(api.merchant_usd(&merchant).await, "1.00");
    // And the original still replays.
    api.post_idempotent("/v1/payments", &payer.key, &body, "k")
        .await
        .expect(201);
    assert_eq!(api.payer_usd(&payer).await, "9.00");
}
}

conformance! {
#[tokio::test]
async fn idempotency_keys_are_scoped_to_the_calling_key() {
    let server = Server::start();
    let api = server.api();
    let merchant = api.create_merchant("Shop", None, None).await;
    let alice = api.create_payer("Alice").await;
    let bob = api.create_payer("Bob").await;
    api.topup(&alice, "10").await;
    api.topup(&bob, "10").await;
    let body = json!({"merchant": merchant.id, "amount": "3", "currency": "USD"});
    let a = api
        .post_idempotent("/v1/payments", &alice.key, &body, "order-1")
        .await
        .expect(201);
    let b = api
        .post_idempotent("/v1/payments", &bob.key, &body, "order-1")
        .await
        .expect(201);
    assert_ne!(a["id"], b["id"]);
    assert_eq!(a["payer"], json!(alice.id));
    assert_eq!(b["payer"], json!(bob.id));
    // Bob may even use Alice's key string with another body.
    let other = json!({"merchant": merchant.id, "amount": "4", "currency": "USD"});
    api.post_idempotent("/v1/payments", &bob.key, &other, "order-2")
        .await
        .expect(201);
    api.post_idempotent("/v1/payments", &alice.key, &other, "order-2")
        .await
        .expect(201);
    assert_eq!(api.payer_usd(&alice).await, "3.00");
    assert_eq!(api.payer_usd(&bob).await, "3.00");
    assert_eq!(api.merchant_usd(&merchant).await, "14.00");
}
}

conformance! {
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn twenty_concurrent_requests_with_one_key_charge_exactly_once() {
    let server = Server::start();
    let api = server.api();
    let merchant = api.create_merchant("Shop", None, None).await;
    let payer = api.create_payer("Ada").await;
    api.topup(&payer, "10").await;
    let body = json!({"merchant": merchant.id, "amount": "0.75", "currency": "USD"});
    let barrier = std::sync::Arc::new(tokio::sync::Barrier::new(20));
    let tasks: Vec<_> = (0..20)
        .map(|_| {
            let api = api.clone();
            let key = payer.key.clone();
            let body = body.clone();
            let barrier = barrier.clone();
            tokio::spawn(async move {
                barrier.wait().await;
                api.post_idempotent("/v1/payments", &key, &body, "same-key")
                    .await
            })
        })
        .collect();
    let mut replies = Vec::new();
    for task in tasks {
        replies.push(task.await.expect("task"));
    }
    for reply in &replies {
        assert_eq!(reply.status, 201, "{}", reply.body);
        assert_eq!(
            reply.body, replies[0].body,
            "every answer is the one payment"
        );
    }
    assert_eq!(api.payer_usd(&payer).await, "9.25");
    assert_eq!(api.merchant_usd(&merchant).await, "0.75");
    assert_eq!(api.list_all_payments(&payer.key).await.len(), 1);
}
}

conformance! {
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn twenty_concurrent_creations_with_one_key_all_answer_the_same_party_and_api_key() {
    let server = Server::start();
    let api = server.api();
    for (path, body, key) in [
        ("/v1/payers", json!({"name": "Ada"}), "create-payer"),
        ("/v1/merchants", json!({"name": "Shop"}), "create-merchant"),
    ] {
        let barrier = std::sync::Arc::new(tokio::sync::Barrier::new(20));
        let tasks: Vec<_> = (0..20)
            .map(|_| {
                let api = api.clone();
                let barrier = barrier.clone();
                let body = body.clone();
                tokio::spawn(async move {
                    barrier.wait().await;
                    api.post_idempotent(path, ADMIN_KEY, &body, key).await
                })
            })
            .collect();
        let mut replies = Vec::new();
        for task in tasks {
            replies.push(task.await.expect("task"));
        }
        for reply in &replies {
            let party = reply.expect(201);
            assert!(
                party["api_key"].is_string(),
                "every answer shows the key: {party}"
            );
            assert_eq!(reply.body, replies[0].body, "{path}: one party for one key");
        }
        // The key that came back works.
        let party = common::party(&replies[0].json());
        api.get(&format!("{path}/{}/balance", party.id), &party.key)
            .await
            .expect(200);
    }
}
}

conformance! {
#[tokio::test]
async fn an_insufficient_funds_answer_is_replayed_as_402_even_after_a_top_up() {
    let server = Server::start();
    let api = server.api();
    let merchant = api.create_merchant("Shop", None, None).await;
    let payer = api.create_payer("Ada").await;
    api.topup(&payer, "1").await;
    let body = json!({"merchant": merchant.id, "amount": "5", "currency": "USD"});
    let first = api
        .post_idempotent("/v1/payments", &payer.key, &body, "too-much")
        .await;
    first.expect_problem(402, "insufficient_funds");
    api.topup(&payer, "10").await;
    let again = api
        .post_idempotent("/v1/payments", &payer.key, &body, "too-much")
        .await;
    again.expect_problem(402, "insufficient_funds");
    assert_eq!(again.body, first.body);
    assert_eq!(api.payer_usd(&payer).await, "11.00");
    // A new key is a new attempt.
    api.post_idempotent("/v1/payments", &payer.key, &body, "second-try")
        .await
        .expect(201);
    assert_eq!(api.payer_usd(&payer).await, "6.00");
}
}

conformance! {
#[tokio::test]
async fn a_request_refused_as_invalid_does_not_use_up_its_key() {
    let server = Server::start();
    let api = server.api();
    let merchant = api.create_merchant("Shop", None, None).await;
    let payer = api.create_payer("Ada").await;
    api.topup(&payer, "10").await;
    api.post_idempotent(
        "/v1/payments",
        &payer.key,
        &json!({"merchant": merchant.id, "amount": "1.0000001", "currency": "USD"}),
        "fix-me",
    )
    .await
    .expect_problem(422, "validation_failed");
    api.post_idempotent(
        "/v1/payments",
        &payer.key,
        &json!({"merchant": merchant.id, "amount": "1", "currency": "USD"}),
        "fix-me",
    )
    .await
    .expect(201);
    assert_eq!(api.payer_usd(&payer).await, "9.00");
}
}

conformance! {
#[tokio::test]
async fn a_payment_key_still_replays_after_a_restart() {
    let dir = TempDir::new();
    let (payer, body, first) = {
        let server = Server::start_in(dir.path(), &[]);
        let api = server.api();
        let merchant = api.create_merchant("Shop", None, None).await;
        let payer = api.create_payer("Ada").await;
        api.topup(&payer, "10").await;
        let body = json!({"merchant": merchant.id, "amount": "2", "currency": "USD"});
        let first = api
            .post_idempotent("/v1/payments", &payer.key, &body, "durable")
            .await;
        first.expect(201);
        (payer, body, first)
    };
    let server = Server::start_in(dir.path(), &[]);
    let api = server.api();
    let again = api
        .post_idempotent("/v1/payments", &payer.key, &body, "durable")
        .await;
    assert_eq!((again.status, &again.body), (201, &first.body));
    assert_eq!(api.payer_usd(&payer).await, "8.00");
}
}
