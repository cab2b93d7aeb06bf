//! Every error code of the contract: status, `application/problem+json`, and the problem fields.
//! Failed requests move no money.

#[macro_use]
mod common;

use common::{ADMIN_KEY, Api, Party, Server, unknown_id};
use reqwest::Method;
use serde_json::json;

/// A merchant with a fee, and a payer holding 10 USD.
async fn setup(api: &Api) -> (Party, Party) {
    let merchant = api.create_merchant("Shop", Some(100), Some("0.01")).await;
    let payer = api.create_payer("Ada").await;
    api.topup(&payer, "10").await;
    (merchant, payer)
}

async fn balances(api: &Api, payer: &Party, merchant: &Party) -> (String, String) {
    (api.payer_usd(payer).await, api.merchant_usd(merchant).await)
}

conformance! {
#[tokio::test]
async fn a_request_without_a_key_is_401_unauthorized() {
    let server = Server::start();
    let api = server.api();
    let (merchant, payer) = setup(&api).await;
    let payment = json!({"merchant": merchant.id, "amount": "1", "currency": "USD"}).to_string();
    let cases = [
        (
            Method::GET,
            format!("/v1/payers/{}/balance", payer.id),
            None,
        ),
        (
            Method::GET,
            format!("/v1/merchants/{}/balance", merchant.id),
            None,
        ),
        (Method::GET, "/v1/payments".to_string(), None),
        (
            Method::POST,
            "/v1/payments".to_string(),
            Some(payment.as_str()),
        ),
        (
            Method::POST,
            "/v1/merchants".to_string(),
            Some(r#"{"name":"x"}"#),
        ),
        (
            Method::POST,
            "/v1/payers".to_string(),
            Some(r#"{"name":"x"}"#),
        ),
    ];
    for (method, path, body) in cases {
        let reply = api.send(method.clone(), &path, None, body, None).await;
        let problem = reply.expect_problem(401, "unauthorized");
        assert_eq!(problem["title"], "Unauthorized", "{method} {path}");
    }
    assert_eq!(
        balances(&api, &payer, &merchant).await,
        ("10.00".into(), "0.00".into())
    );
}
}

conformance! {
#[tokio::test]
async fn a_request_with_a_wrong_or_malformed_key_is_401_unauthorized() {
    let server = Server::start();
    let api = server.api();
    let (merchant, payer) = setup(&api).await;
    let body = json!({"merchant": merchant.id, "amount": "1", "currency": "USD"}).to_string();
    let wrong_keys = [
        "pyr_not-a-real-key".to_string(),
        format!("{}x", payer.key),
        String::new(),
    ];
    for key in &wrong_keys {
        api.send(Method::POST, "/v1/payments", Some(key), Some(&body), None)
            .await
            .expect_problem(401, "unauthorized");
        api.send(
            Method::GET,
            &format!("/v1/payers/{}/balance", payer.id),
            Some(key),
            None,
            None,
        )
        .await
        .expect_problem(401, "unauthorized");
    }
    // Not a bearer token at all.
    let reply = reqwest::Client::builder()
        .no_proxy()
        .build()
        .unwrap()
        .get(format!("{}/v1/payments", api.base))
        .header("authorization", format!("Basic {}", payer.key))
        .send()
        .await
        .unwrap();
    assert_eq!(reply.status().as_u16(), 401);
    assert_eq!(
        reply.headers()["content-type"].to_str().unwrap(),
        "application/problem+json"
    );
    let problem: serde_json::Value = reply.json().await.unwrap();
    assert_eq!(problem["code"], "unauthorized");
    assert_eq!(
        balances(&api, &payer, &merchant).await,
        ("10.00".into(), "0.00".into())
    );
}
}

conformance! {
#[tokio::test]
async fn unknown_objects_and_routes_are_404_not_found() {
    let server = Server::start();
    let api = server.api();
    let (merchant, payer) = setup(&api).await;
    let missing_payment = unknown_id("pay");
    let missing_payer = unknown_id("pyr");
    let missing_merchant = unknown_id("mer");
    for path in [
        format!("/v1/payments/{missing_payment}"),
        "/v1/payments/not-an-id".to_string(),
        format!("/v1/payers/{missing_payer}/balance"),
        format!("/v1/payers/{missing_payer}/transactions"),
        format!("/v1/merchants/{missing_merchant}/balance"),
        "/v1/payers/nonsense/balance".to_string(),
        "/v1/nothing-here".to_string(),
        format!("/v1/payments?starting_after={missing_payment}"),
    ] {
        let reply = api.get(&path, ADMIN_KEY).await;
        reply.expect_problem(404, "not_found");
    }
    api.post(
        &format!("/v1/payments/{missing_payment}/refunds"),
        ADMIN_KEY,
        &json!({}),
    )
    .await
    .expect_problem(404, "not_found");
    api.post(
        &format!("/v1/payers/{missing_payer}/topups"),
        ADMIN_KEY,
        &json!({"amount": "1", "currency": "USD", "source": "sandbox"}),
    )
    .await
    .expect_problem(404, "not_found");
    // Paying a merchant that does not exist.
    api.post(
        "/v1/payments",
        &payer.key,
        &json!({"merchant": missing_merchant, "amount": "1", "currency": "USD"}),
    )
    .await
    .expect_problem(404, "not_found");
    assert_eq!(
        balances(&api, &payer, &merchant).await,
        ("10.00".into(), "0.00".into())
    );
}
}

conformance! {
#[tokio::test]
async fn bad_payment_amounts_fields_and_json_are_422_validation_failed_and_move_no_money() {
    let server = Server::start();
    let api = server.api();
    let (merchant, payer) = setup(&api).await;
    api.topup(&payer, "10000").await;
    let m = &merchant.id;
    let bodies = [
        // amount as a JSON number
        json!({"merchant": m, "amount": 1, "currency": "USD"}).to_string(),
        json!({"merchant": m, "amount": 0.5, "currency": "USD"}).to_string(),
        // negative, zero
        json!({"merchant": m, "amount": "-1", "currency": "USD"}).to_string(),
        json!({"merchant": m, "amount": "0", "currency": "USD"}).to_string(),
        json!({"merchant": m, "amount": "0.000000", "currency": "USD"}).to_string(),
        // seven decimals
        json!({"merchant": m, "amount": "0.0000001", "currency": "USD"}).to_string(),
        json!({"merchant": m, "amount": "1.1234567", "currency": "USD"}).to_string(),
        // not a plain decimal
        json!({"merchant": m, "amount": "1e2", "currency": "USD"}).to_string(),
        json!({"merchant": m, "amount": "", "currency": "USD"}).to_string(),
        json!({"merchant": m, "amount": " 1", "currency": "USD"}).to_string(),
        // unknown or not enabled currencies
        json!({"merchant": m, "amount": "1", "currency": "XYZ"}).to_string(),
        json!({"merchant": m, "amount": "1", "currency": "US"}).to_string(),
        json!({"merchant": m, "amount": "1", "currency": "CHF"}).to_string(),
        // above the maximum of 10000
        json!({"merchant": m, "amount": "10000.000001", "currency": "USD"}).to_string(),
        json!({"merchant": m, "amount": "10001", "currency": "USD"}).to_string(),
        json!({"merchant": m, "amount": "99999999999999999999999", "currency": "USD"}).to_string(),
        // unknown field
        json!({"merchant": m, "amount": "1", "currency": "USD", "tip": "1"}).to_string(),
        // missing fields
        json!({"merchant": m, "currency": "USD"}).to_string(),
        json!({"amount": "1", "currency": "USD"}).to_string(),
        // not a merchant id
        json!({"merchant": "shop", "amount": "1", "currency": "USD"}).to_string(),
        // malformed JSON, and no body at all
        format!(r#"{{"merchant": "{m}", "amount": "1""#),
        "not json".to_string(),
        "[]".to_string(),
        String::new(),
    ];
    for body in &bodies {
        let reply = api.post_raw("/v1/payments", &payer.key, body).await;
        let problem = reply.expect_problem(422, "validation_failed");
        assert_eq!(problem["title"], "Validation failed", "body {body}");
    }
    assert_eq!(
        balances(&api, &payer, &merchant).await,
        ("10010.00".into(), "0.00".into())
    );
    // The boundary itself is allowed.
    let paid = api.pay(&payer, &merchant, "10000").await.expect(201);
    assert_eq!(paid["amount"], "10000.00");
}
}

conformance! {
#[tokio::test]
async fn bad_topups_and_refunds_are_422_validation_failed_and_move_no_money() {
    let server = Server::start();
    let api = server.api();
    let (merchant, payer) = setup(&api).await;
    let payment = api.pay(&payer, &merchant, "4").await.expect(201);
    let path = format!("/v1/payers/{}/topups", payer.id);
    for body in [
        json!({"amount": 5, "currency": "USD", "source": "sandbox"}),
        json!({"amount": "-5", "currency": "USD", "source": "sandbox"}),
        json!({"amount": "0", "currency": "USD", "source": "sandbox"}),
        json!({"amount": "0.1234567", "currency": "USD", "source": "sandbox"}),
        json!({"amount": "5", "currency": "ABC", "source": "sandbox"}),
        json!({"amount": "10000.01", "currency": "USD", "source": "sandbox"}),
        json!({"amount": "5", "currency": "USD", "source": "card"}),
        json!({"amount": "5", "currency": "USD"}),
        json!({"amount": "5", "currency": "USD", "source": "sandbox", "extra": true}),
    ] {
        api.post(&path, ADMIN_KEY, &body)
            .await
            .expect_problem(422, "validation_failed");
    }
    let refunds = format!("/v1/payments/{}/refunds", payment["id"].as_str().unwrap());
    for body in [
        r#"{"amount": 1}"#,
        r#"{"amount": "0"}"#,
        r#"{"amount": "-1"}"#,
        r#"{"amount": "0.00000001"}"#,
        r#"{"amount": "1", "reason": "x"}"#,
        r#"{"amount": "#,
    ] {
        api.post_raw(&refunds, &merchant.key, body)
            .await
            .expect_problem(422, "validation_failed");
    }
    for body in [
        json!({"name": ""}),
        json!({"name": "x", "fee_bps": 10_001}),
        json!({"name": "x", "fee_bps": -1}),
        json!({"name": "x", "fee_fixed": "-0.1"}),
        json!({"name": "x", "fee_fixed": 0.1}),
        json!({"nom": "x"}),
    ] {
        api.post("/v1/merchants", ADMIN_KEY, &body)
            .await
            .expect_problem(422, "validation_failed");
    }
    api.post("/v1/payments/batch", ADMIN_KEY, &json!({"payments": []}))
        .await
        .expect_problem(422, "validation_failed");
    assert_eq!(
        balances(&api, &payer, &merchant).await,
        ("6.00".into(), "3.95".into())
    );
}
}

conformance! {
#[tokio::test]
async fn a_payment_beyond_the_balance_is_402_insufficient_funds_and_moves_no_money() {
    let server = Server::start();
    let api = server.api();
    let (merchant, payer) = setup(&api).await;
    let problem = api
        .pay(&payer, &merchant, "10.000001")
        .await
        .expect_problem(402, "insufficient_funds");
    assert_eq!(problem["title"], "Insufficient funds");
    // A payer who never topped up has no wallet at all.
    let empty = api.create_payer("Empty").await;
    api.pay(&empty, &merchant, "0.000001")
        .await
        .expect_problem(402, "insufficient_funds");
    assert_eq!(
        balances(&api, &payer, &merchant).await,
        ("10.00".into(), "0.00".into())
    );
    assert_eq!(api.payer_usd(&empty).await, "0.00");
    // Exactly the balance goes through.
    api.pay(&payer, &merchant, "10").await.expect(201);
    assert_eq!(api.payer_usd(&payer).await, "0.00");
}
}

conformance! {
#[tokio::test]
async fn a_payment_whose_merchant_share_fits_but_whose_fee_does_not_is_402_and_the_server_keeps_working()
 {
    let server = Server::start();
    let api = server.api();
    // 10% fee: paying 10.5 from 10 moves 9.45 to the merchant (fits) and 1.05 in fees (does not).
    let merchant = api.create_merchant("Shop", Some(1000), None).await;
    let payer = api.create_payer("Ada").await;
    api.topup(&payer, "10").await;
    api.pay(&payer, &merchant, "10.5")
        .await
        .expect_problem(402, "insufficient_funds");
    let batch = json!({"payments": [
        {"payer": payer.id, "merchant": merchant.id, "amount": "10.5", "currency": "USD"},
        {"payer": payer.id, "merchant": merchant.id, "amount": "1", "currency": "USD"},
    ]});
    let answer = api
        .post("/v1/payments/batch", ADMIN_KEY, &batch)
        .await
        .expect(200);
    assert_eq!(answer["results"][0]["status"], "failed");
    assert_eq!(answer["results"][0]["code"], "insufficient_funds");
    assert_eq!(answer["results"][1]["status"], "succeeded");
    // Nothing moved for the refused ones, and the server still takes payments.
    assert_eq!(
        balances(&api, &payer, &merchant).await,
        ("9.00".into(), "0.90".into())
    );
    api.pay(&payer, &merchant, "9").await.expect(201);
    assert_eq!(
        balances(&api, &payer, &merchant).await,
        ("0.00".into(), "9.00".into())
    );
}
}

conformance! {
#[tokio::test]
async fn a_declined_topup_is_402_funding_declined_and_credits_nothing() {
    let server = Server::start();
    let api = server.api();
    let (merchant, payer) = setup(&api).await;
    for key in [ADMIN_KEY, payer.key.as_str()] {
        let problem = api
            .post(
                &format!("/v1/payers/{}/topups", payer.id),
                key,
                &json!({"amount": "5", "currency": "USD", "source": "sandbox_decline"}),
            )
            .await
            .expect_problem(402, "funding_declined");
        assert_eq!(problem["title"], "Funding declined");
    }
    assert_eq!(
        balances(&api, &payer, &merchant).await,
        ("10.00".into(), "0.00".into())
    );
    let statement = api
        .get(&format!("/v1/payers/{}/transactions", payer.id), &payer.key)
        .await
        .expect(200);
    assert_eq!(
        statement["data"].as_array().unwrap().len(),
        1,
        "{statement}"
    );
}
}

conformance! {
#[tokio::test]
async fn an_idempotency_key_reused_with_another_body_is_422_idempotency_key_reused() {
    let server = Server::start();
    let api = server.api();
    let (merchant, payer) = setup(&api).await;
    let first = json!({"merchant": merchant.id, "amount": "1", "currency": "USD"});
    let second = json!({"merchant": merchant.id, "amount": "2", "currency": "USD"});
    api.post_idempotent("/v1/payments", &payer.key, &first, "k-1")
        .await
        .expect(201);
    let problem = api
        .post_idempotent("/v1/payments", &payer.key, &second, "k-1")
        .await
        .expect_problem(422, "idempotency_key_reused");
    assert_eq!(problem["title"], "Idempotency key reused");
    assert_eq!(
        balances(&api, &payer, &merchant).await,
        ("9.00".into(), "0.98".into())
    );
}
}

conformance! {
#[tokio::test]
async fn a_refund_beyond_what_is_left_is_422_refund_exceeds_payment_and_moves_no_money() {
    let server = Server::start();
    let api = server.api();
    let (merchant, payer) = setup(&api).await;
    let payment = api.pay(&payer, &merchant, "2").await.expect(201);
    let path = format!("/v1/payments/{}/refunds", payment["id"].as_str().unwrap());
    let problem = api
        .post(&path, &merchant.key, &json!({"amount": "2.000001"}))
        .await
        .expect_problem(422, "refund_exceeds_payment");
    assert_eq!(problem["title"], "Refund exceeds payment");
    api.post(&path, &merchant.key, &json!({"amount": "1.5"}))
        .await
        .expect(201);
    let before = balances(&api, &payer, &merchant).await;
    api.post(&path, ADMIN_KEY, &json!({"amount": "0.500001"}))
        .await
        .expect_problem(422, "refund_exceeds_payment");
    assert_eq!(balances(&api, &payer, &merchant).await, before);
    api.post(&path, ADMIN_KEY, &json!({"amount": "0.5"}))
        .await
        .expect(201);
    api.post(&path, ADMIN_KEY, &json!({"amount": "0.000001"}))
        .await
        .expect_problem(422, "refund_exceeds_payment");
    assert_eq!(
        balances(&api, &payer, &merchant).await,
        ("10.00".into(), "0.00".into())
    );
}
}

conformance! {
#[tokio::test]
async fn an_unsupported_method_answers_with_a_problem_too() {
    let server = Server::start();
    let api = server.api();
    let reply = api
        .send(Method::DELETE, "/v1/payments", Some(ADMIN_KEY), None, None)
        .await;
    reply.expect_problem(405, "method_not_allowed");
}
}
