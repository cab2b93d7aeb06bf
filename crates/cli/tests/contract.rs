//! The whole flow of `/work/shared/CONTRACT.md`, against the real binary.

#[macro_use]
mod common;

use common::{ADMIN_KEY, Party, Server, amount, available, micros};
use serde_json::{Value, json};

fn now_secs() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock after 1970")
        .as_secs()
}

conformance! {
#[tokio::test]
async fn a_merchant_is_created_with_the_fees_it_asks_for_and_its_key_shown_once() {
    let server = Server::start();
    let api = server.api();
    let reply = api
        .post(
            "/v1/merchants",
            ADMIN_KEY,
            &json!({"name": "Tea Shop", "fee_bps": 250, "fee_fixed": "0.01"}),
        )
        .await;
    let merchant = reply.expect(201);
    assert_eq!(reply.content_type(), "application/json");
    assert!(merchant["id"].as_str().unwrap().starts_with("mer_"));
    assert_eq!(merchant["name"], "Tea Shop");
    assert_eq!(merchant["fee_bps"], 250);
    assert_eq!(merchant["fee_fixed"], "0.01");
    let key = merchant["api_key"].as_str().expect("api_key is a string");
    assert!(key.len() >= 20, "a real secret, got {key:?}");

    // The key works: the merchant can read its own balance.
    let balance = api
        .get(
            &format!("/v1/merchants/{}/balance", merchant["id"].as_str().unwrap()),
            key,
        )
        .await
        .expect(200);
    assert_eq!(balance, json!({"balances": []}));
}
}

conformance! {
#[tokio::test]
async fn a_merchant_created_without_fees_pays_a_default_fee_of_zero() {
    let server = Server::start();
    let api = server.api();
    let merchant = api
        .post("/v1/merchants", ADMIN_KEY, &json!({"name": "Plain"}))
        .await
        .expect(201);
    assert_eq!(merchant["fee_bps"], 0);
    assert_eq!(merchant["fee_fixed"], "0.00");

    let merchant = common::party(&merchant);
    let payer = api.create_payer("Ada").await;
    api.topup(&payer, "5").await;
    let payment = api.pay(&payer, &merchant, "1.234567").await.expect(201);
    assert_eq!(payment["fee"], "0.00");
    assert_eq!(payment["net"], "1.234567");
    assert_eq!(api.merchant_usd(&merchant).await, "1.234567");
    assert_eq!(api.payer_usd(&payer).await, "3.765433");
}
}

conformance! {
#[tokio::test]
async fn a_merchant_created_without_fees_pays_the_default_fee_the_operator_configured() {
    let server = Server::start_with(&["--default-fee-bps", "150", "--default-fee-fixed", "0.001"]);
    let api = server.api();
    let merchant = api
        .post("/v1/merchants", ADMIN_KEY, &json!({"name": "Defaulted"}))
        .await
        .expect(201);
    assert_eq!(merchant["fee_bps"], 150);
    assert_eq!(merchant["fee_fixed"], "0.001");
    let merchant = common::party(&merchant);
    let payer = api.create_payer("Ada").await;
    api.topup(&payer, "10").await;
    // floor(2 × 150 / 10000) = 0.03, plus 0.001.
    let payment = api.pay(&payer, &merchant, "2").await.expect(201);
    assert_eq!(payment["fee"], "0.031");
    assert_eq!(payment["net"], "1.969");
}
}

conformance! {
#[tokio::test]
async fn a_payer_is_created_with_a_prefixed_id_and_an_api_key() {
    let server = Server::start();
    let api = server.api();
    let payer = api
        .post("/v1/payers", ADMIN_KEY, &json!({"name": "Ada"}))
        .await
        .expect(201);
    assert!(payer["id"].as_str().unwrap().starts_with("pyr_"));
    assert_eq!(payer["name"], "Ada");
    let key = payer["api_key"].as_str().expect("api_key");
    assert!(key.len() >= 20);
    let balance = api
        .get(
            &format!("/v1/payers/{}/balance", payer["id"].as_str().unwrap()),
            key,
        )
        .await
        .expect(200);
    assert_eq!(balance, json!({"balances": []}));
}
}

conformance! {
#[tokio::test]
async fn a_sandbox_topup_answers_201_and_credits_the_wallet_whether_the_operator_or_the_payer_asks()
{
    let server = Server::start();
    let api = server.api();
    let payer = api.create_payer("Ada").await;

    let topup = api
        .post(
            &format!("/v1/payers/{}/topups", payer.id),
            ADMIN_KEY,
            &json!({"amount": "12.5", "currency": "USD", "source": "sandbox"}),
        )
        .await
        .expect(201);
    assert!(topup["id"].as_str().unwrap().starts_with("top_"));
    assert_eq!(topup["status"], "succeeded");
    assert_eq!(topup["amount"], "12.50");
    assert_eq!(topup["currency"], "USD");

    let own = api
        .post(
            &format!("/v1/payers/{}/topups", payer.id),
            &payer.key,
            &json!({"amount": "0.000001", "currency": "USD", "source": "sandbox"}),
        )
        .await
        .expect(201);
    assert_eq!(own["amount"], "0.000001");
    assert_ne!(own["id"], topup["id"]);

    let eur = api
        .post(
            &format!("/v1/payers/{}/topups", payer.id),
            &payer.key,
            &json!({"amount": "3", "currency": "EUR", "source": "sandbox"}),
        )
        .await
        .expect(201);
    assert_eq!(eur["currency"], "EUR");

    for key in [ADMIN_KEY, payer.key.as_str()] {
        let balance = api
            .get(&format!("/v1/payers/{}/balance", payer.id), key)
            .await
            .expect(200);
        assert_eq!(available(&balance, "USD"), "12.500001");
        assert_eq!(available(&balance, "EUR"), "3.00");
        assert_eq!(balance["balances"].as_array().unwrap().len(), 2);
    }
}
}

async fn funded(api: &common::Api, amount: &str) -> Party {
    let payer = api.create_payer("Payer").await;
    api.topup(&payer, amount).await;
    payer
}

conformance! {
#[tokio::test]
async fn a_payment_answers_201_with_every_contract_field_and_exact_fee_and_net() {
    let server = Server::start();
    let api = server.api();
    let merchant = api.create_merchant("Shop", Some(290), Some("0.0003")).await;
    let payer = funded(&api, "1").await;

    let before = now_secs();
    let reply = api
        .post(
            "/v1/payments",
            &payer.key,
            &json!({
                "merchant": merchant.id,
                "amount": "0.0025",
                "currency": "USD",
                "description": "one article",
                "reference": "order-17",
            }),
        )
        .await;
    let payment = reply.expect(201);
    assert_eq!(reply.content_type(), "application/json");
    assert!(payment["id"].as_str().unwrap().starts_with("pay_"));
    assert_eq!(payment["status"], "succeeded");
    assert_eq!(payment["payer"], json!(payer.id));
    assert_eq!(payment["merchant"], json!(merchant.id));
    assert_eq!(payment["amount"], "0.0025");
    assert_eq!(payment["currency"], "USD");
    // floor(2500 µ × 290 / 10000) = 72 µ, plus 300 µ fixed.
    assert_eq!(payment["fee"], "0.000372");
    assert_eq!(payment["net"], "0.002128");
    assert_eq!(payment["description"], "one article");
    assert_eq!(payment["reference"], "order-17");
    let created = payment["created_at"]
        .as_u64()
        .expect("created_at in seconds");
    assert!(
        (before.saturating_sub(5)..=now_secs() + 5).contains(&created),
        "created_at {created} is not now"
    );

    assert_eq!(api.payer_usd(&payer).await, "0.9975");
    assert_eq!(api.merchant_usd(&merchant).await, "0.002128");
}
}

conformance! {
#[tokio::test]
async fn fees_follow_the_formula_for_many_amounts_and_never_exceed_the_amount() {
    let server = Server::start();
    let api = server.api();
    let payer = funded(&api, "10000").await;
    let schedules: [(u32, &str); 4] = [(0, "0"), (290, "0.30"), (10_000, "0"), (1, "0.000001")];
    let capped = api.create_merchant("Greedy", Some(500), Some("1")).await;
    // A fixed fee larger than the amount is capped at the amount: net is zero.
    let payment = api.pay(&payer, &capped, "0.5").await.expect(201);
    assert_eq!(payment["fee"], "0.50");
    assert_eq!(payment["net"], "0.00");
    assert_eq!(api.merchant_usd(&capped).await, "0.00");

    let mut spent: u64 = 500_000;
    for (bps, fixed) in schedules {
        let merchant = api.create_merchant("Shop", Some(bps), Some(fixed)).await;
        let mut earned: u64 = 0;
        for amount_micros in [1u64, 7, 9_999, 10_001, 123_456_789, 999_999_999] {
            let fixed_micros = micros(fixed) as u64;
            let fee = (amount_micros * u64::from(bps) / 10_000 + fixed_micros).min(amount_micros);
            let payment = api
                .pay(&payer, &merchant, &amount(amount_micros))
                .await
                .expect(201);
            assert_eq!(payment["amount"], amount(amount_micros));
            assert_eq!(
                payment["fee"],
                amount(fee),
                "fee on {amount_micros} µ at {bps} bps + {fixed}"
            );
            assert_eq!(payment["net"], amount(amount_micros - fee));
            earned += amount_micros - fee;
            spent += amount_micros;
        }
        assert_eq!(api.merchant_usd(&merchant).await, amount(earned));
    }
    assert_eq!(api.payer_usd(&payer).await, amount(10_000_000_000 - spent));
}
}

conformance! {
#[tokio::test]
async fn a_payment_is_readable_by_its_payer_its_merchant_and_the_operator() {
    let server = Server::start();
    let api = server.api();
    let merchant = api.create_merchant("Shop", Some(100), None).await;
    let payer = funded(&api, "5").await;
    let payment = api.pay(&payer, &merchant, "1.5").await.expect(201);
    let path = format!("/v1/payments/{}", payment["id"].as_str().unwrap());
    for key in [payer.key.as_str(), merchant.key.as_str(), ADMIN_KEY] {
        let read = api.get(&path, key).await.expect(200);
        assert_eq!(read, payment, "GET shows the payment as created");
    }
}
}

conformance! {
#[tokio::test]
async fn payments_are_listed_newest_first_and_paginate_with_limit_starting_after_and_has_more() {
    let server = Server::start();
    let api = server.api();
    let merchant = api.create_merchant("Shop", None, None).await;
    let other_merchant = api.create_merchant("Other", None, None).await;
    let payer = funded(&api, "100").await;
    let mut made = Vec::new();
    for n in 1..=5 {
        let to = if n == 3 { &other_merchant } else { &merchant };
        let payment = api.pay(&payer, to, &format!("{n}")).await.expect(201);
        made.push(payment);
    }
    let newest_first: Vec<Value> = made.iter().rev().cloned().collect();

    // Everything, by every caller that may see it.
    let all = api.get("/v1/payments", &payer.key).await.expect(200);
    assert_eq!(all["data"], json!(newest_first));
    assert_eq!(all["has_more"], false);
    let operator = api.get("/v1/payments", ADMIN_KEY).await.expect(200);
    assert_eq!(operator["data"], json!(newest_first));
    let mine = api.get("/v1/payments", &merchant.key).await.expect(200);
    let expected: Vec<Value> = newest_first
        .iter()
        .filter(|p| p["merchant"] == json!(merchant.id))
        .cloned()
        .collect();
    assert_eq!(mine["data"], json!(expected));

    // Pages of two.
    let page1 = api
        .get("/v1/payments?limit=2", &payer.key)
        .await
        .expect(200);
    assert_eq!(page1["data"], json!(newest_first[0..2]));
    assert_eq!(page1["has_more"], true);
    let cursor = page1["data"][1]["id"].as_str().unwrap();
    let page2 = api
        .get(
            &format!("/v1/payments?limit=2&starting_after={cursor}"),
            &payer.key,
        )
        .await
        .expect(200);
    assert_eq!(page2["data"], json!(newest_first[2..4]));
    assert_eq!(page2["has_more"], true);
    let cursor = page2["data"][1]["id"].as_str().unwrap();
    let page3 = api
        .get(
            &format!("/v1/payments?limit=2&starting_after={cursor}"),
            &payer.key,
        )
        .await
        .expect(200);
    assert_eq!(page3["data"], json!(newest_first[4..5]));
    assert_eq!(page3["has_more"], false);
    let cursor = page3["data"][0]["id"].as_str().unwrap();
    let empty = api
        .get(&format!("/v1/payments?starting_after={cursor}"), &payer.key)
        .await
        .expect(200);
    assert_eq!(empty["data"], json!([]));
    assert_eq!(empty["has_more"], false);

    // An exact fit has nothing more.
    let exact = api
        .get("/v1/payments?limit=5", &payer.key)
        .await
        .expect(200);
    assert_eq!(exact["has_more"], false);
    assert_eq!(exact["data"].as_array().unwrap().len(), 5);
    for bad in ["0", "101", "-1", "ten"] {
        api.get(&format!("/v1/payments?limit={bad}"), &payer.key)
            .await
            .expect_problem(422, "validation_failed");
    }
}
}

conformance! {
#[tokio::test]
async fn a_batch_answers_every_item_in_order_with_failures_in_place() {
    let server = Server::start();
    let api = server.api();
    let merchant = api.create_merchant("Shop", Some(1000), None).await;
    let payer = funded(&api, "10").await;
    let other = funded(&api, "1").await;
    let item = |payer: &Party, amount: Value| json!({"payer": payer.id, "merchant": merchant.id, "amount": amount, "currency": "USD"});
    let batch = json!({"payments": [
        item(&payer, json!("3")),
        item(&payer, json!("8")),        // 7 left: insufficient
        item(&payer, json!(2)),          // a JSON number: invalid
        item(&other, json!("0.5")),
        {"payer": payer.id, "merchant": merchant.id, "amount": "1", "currency": "XYZ"},
        {"payer": payer.id, "merchant": merchant.id, "amount": "1", "currency": "USD", "reference": "r-6"},
        item(&payer, json!("6")),        // exactly what is left
        item(&payer, json!("0.000001")), // nothing left
    ]});
    let reply = api.post("/v1/payments/batch", ADMIN_KEY, &batch).await;
    let answer = reply.expect(200);
    let results = answer["results"].as_array().expect("results");
    assert_eq!(results.len(), 8);
    let succeeded = |index: usize| {
        assert_eq!(
            results[index]["status"], "succeeded",
            "item {index}: {answer}"
        );
        assert!(results[index].get("code").is_none());
        results[index]["id"].as_str().expect("id").to_string()
    };
    let failed = |index: usize, code: &str| {
        assert_eq!(results[index]["status"], "failed", "item {index}: {answer}");
        assert_eq!(results[index]["code"], code, "item {index}: {answer}");
        assert!(results[index].get("id").is_none());
    };
    let first = succeeded(0);
    failed(1, "insufficient_funds");
    failed(2, "validation_failed");
    let fourth = succeeded(3);
    failed(4, "validation_failed");
    let sixth = succeeded(5);
    let seventh = succeeded(6);
    failed(7, "insufficient_funds");

    for (id, payer_id, amount, fee) in [
        (&first, &payer.id, "3.00", "0.30"),
        (&fourth, &other.id, "0.50", "0.05"),
        (&sixth, &payer.id, "1.00", "0.10"),
        (&seventh, &payer.id, "6.00", "0.60"),
    ] {
        let payment = api
            .get(&format!("/v1/payments/{id}"), ADMIN_KEY)
            .await
            .expect(200);
        assert_eq!(payment["payer"], json!(payer_id));
        assert_eq!(payment["amount"], amount);
        assert_eq!(payment["fee"], fee);
    }
    let sixth = api
        .get(&format!("/v1/payments/{sixth}"), &payer.key)
        .await
        .expect(200);
    assert_eq!(sixth["reference"], "r-6");
    assert_eq!(api.payer_usd(&payer).await, "0.00");
    assert_eq!(api.payer_usd(&other).await, "0.50");
    assert_eq!(api.merchant_usd(&merchant).await, "9.45");
    // Listed newest first: batch order is creation order.
    let listed = api.get("/v1/payments", &payer.key).await.expect(200);
    let ids: Vec<&str> = listed["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["id"].as_str().unwrap())
        .collect();
    assert_eq!(
        ids,
        [
            seventh.as_str(),
            sixth["id"].as_str().unwrap(),
            first.as_str()
        ]
    );
}
}

conformance! {
#[tokio::test]
async fn a_refund_without_an_amount_returns_all_that_is_left_including_the_fee() {
    let server = Server::start();
    let api = server.api();
    let merchant = api.create_merchant("Shop", Some(1000), None).await;
    let payer = funded(&api, "10").await;
    let payment = api.pay(&payer, &merchant, "10").await.expect(201);
    assert_eq!(payment["fee"], "1.00");
    let id = payment["id"].as_str().unwrap();
    assert_eq!(api.merchant_usd(&merchant).await, "9.00");
    assert_eq!(api.payer_usd(&payer).await, "0.00");

    // An empty body and `{}` both mean "the rest"; the merchant asks for it.
    let refund = api
        .post_raw(&format!("/v1/payments/{id}/refunds"), &merchant.key, "")
        .await
        .expect(201);
    assert!(refund["id"].as_str().unwrap().starts_with("ref_"));
    assert_eq!(refund["payment"], json!(id));
    assert_eq!(refund["amount"], "10.00");
    assert_eq!(refund["currency"], "USD");
    assert_eq!(api.payer_usd(&payer).await, "10.00");
    assert_eq!(api.merchant_usd(&merchant).await, "0.00");
    let after = api
        .get(&format!("/v1/payments/{id}"), ADMIN_KEY)
        .await
        .expect(200);
    assert_eq!(after["amount_refunded"], "10.00");

    // Nothing is left: a further full refund is refused, and changes nothing.
    api.post(&format!("/v1/payments/{id}/refunds"), ADMIN_KEY, &json!({}))
        .await
        .expect_problem(422, "refund_exceeds_payment");
    assert_eq!(api.payer_usd(&payer).await, "10.00");
    assert_eq!(api.merchant_usd(&merchant).await, "0.00");
}
}

conformance! {
#[tokio::test]
async fn partial_refunds_return_the_fee_in_proportion_and_money_adds_up_after_each() {
    let server = Server::start();
    let api = server.api();
    // 1.00 pays a fee of floor(1.00 × 300 / 10000) + 0.01 = 0.04.
    let merchant = api.create_merchant("Shop", Some(300), Some("0.01")).await;
    let payer = funded(&api, "2").await;
    let payment = api.pay(&payer, &merchant, "1").await.expect(201);
    assert_eq!(payment["fee"], "0.04");
    assert_eq!(payment["net"], "0.96");
    let id = payment["id"].as_str().unwrap().to_string();
    let fee = micros("0.04");
    let topped_up = micros("2");

    let mut fees_back = 0i128;
    let mut refunded = 0i128;
    // (asked, by whom, the fee share the running total gives back)
    let steps = [
        (Some("0.25"), merchant.key.as_str(), "0.01"),
        (Some("0.333333"), ADMIN_KEY, "0.013333"),
        (None, merchant.key.as_str(), "0.016667"),
    ];
    for (asked, key, fee_refunded) in steps {
        let body = match asked {
            Some(a) => json!({"amount": a}),
            None => json!({}),
        };
        let refund = api
            .post(&format!("/v1/payments/{id}/refunds"), key, &body)
            .await
            .expect(201);
        let amount_back = micros(refund["amount"].as_str().unwrap());
        if let Some(a) = asked {
            assert_eq!(amount_back, micros(a));
        }
        assert_eq!(refund["fee_refunded"], fee_refunded);
        fees_back += micros(fee_refunded);
        refunded += amount_back;

        let payer_now = micros(&api.payer_usd(&payer).await);
        let merchant_now = micros(&api.merchant_usd(&merchant).await);
        assert_eq!(payer_now, topped_up - micros("1") + refunded);
        assert_eq!(
            merchant_now,
            micros("0.96") - (refunded - fees_back),
            "the merchant gives back the net share"
        );
        assert_eq!(
            payer_now + merchant_now + (fee - fees_back),
            topped_up,
            "payer + merchant + fees kept = money in"
        );
        let read = api
            .get(&format!("/v1/payments/{id}"), ADMIN_KEY)
            .await
            .expect(200);
        assert_eq!(micros(read["amount_refunded"].as_str().unwrap()), refunded);
    }
    assert_eq!(refunded, micros("1"));
    assert_eq!(fees_back, fee, "the whole fee came back");
    assert_eq!(api.payer_usd(&payer).await, "2.00");
    assert_eq!(api.merchant_usd(&merchant).await, "0.00");
}
}

conformance! {
#[tokio::test]
async fn payer_transactions_list_every_entry_newest_first_with_a_running_balance() {
    let server = Server::start();
    let api = server.api();
    let merchant = api.create_merchant("Shop", Some(500), None).await;
    let payer = api.create_payer("Ada").await;
    let topup = api.topup(&payer, "10").await;
    let first = api.pay(&payer, &merchant, "3").await.expect(201);
    // A refused payment leaves no entry.
    api.pay(&payer, &merchant, "100")
        .await
        .expect_problem(402, "insufficient_funds");
    let second = api.pay(&payer, &merchant, "2").await.expect(201);
    let refund = api
        .post(
            &format!("/v1/payments/{}/refunds", second["id"].as_str().unwrap()),
            &merchant.key,
            &json!({"amount": "0.5"}),
        )
        .await
        .expect(201);

    let expected = [
        (&refund["id"], "refund", "credit", "0.50", "5.50"),
        (&second["id"], "payment", "debit", "2.00", "5.00"),
        (&first["id"], "payment", "debit", "3.00", "7.00"),
        (&topup["id"], "topup", "credit", "10.00", "10.00"),
    ];
    let path = format!("/v1/payers/{}/transactions", payer.id);
    for key in [payer.key.as_str(), ADMIN_KEY] {
        let list = api.get(&path, key).await.expect(200);
        assert_eq!(list["has_more"], false);
        let data = list["data"].as_array().unwrap();
        assert_eq!(data.len(), expected.len(), "{list}");
        for (entry, (id, kind, direction, amount, running)) in data.iter().zip(expected) {
            assert_eq!(&entry["id"], id, "{entry}");
            assert_eq!(entry["type"], kind, "{entry}");
            assert_eq!(entry["direction"], direction, "{entry}");
            assert_eq!(entry["amount"], amount, "{entry}");
            assert_eq!(entry["currency"], "USD", "{entry}");
            assert_eq!(entry["running_balance"], running, "{entry}");
        }
    }
    assert_eq!(api.payer_usd(&payer).await, "5.50");

    let page = api
        .get(&format!("{path}?limit=3"), &payer.key)
        .await
        .expect(200);
    assert_eq!(page["has_more"], true);
    assert_eq!(page["data"].as_array().unwrap().len(), 3);
    let cursor = first["id"].as_str().unwrap();
    let rest = api
        .get(&format!("{path}?starting_after={cursor}"), &payer.key)
        .await
        .expect(200);
    assert_eq!(rest["has_more"], false);
    assert_eq!(rest["data"].as_array().unwrap().len(), 1);
    assert_eq!(rest["data"][0]["id"], topup["id"]);
}
}

conformance! {
#[tokio::test]
async fn healthz_answers_200_and_openapi_json_is_an_openapi_document() {
    let server = Server::start();
    let api = server.api();
    let health = api.get_anonymous("/healthz").await;
    assert_eq!(health.status, 200, "{}", health.body);

    let openapi = api.get_anonymous("/openapi.json").await;
    assert_eq!(openapi.status, 200);
    assert!(openapi.content_type().starts_with("application/json"));
    let document = openapi.json();
    let version = document["openapi"].as_str().expect("an `openapi` version");
    assert!(version.starts_with('3'), "OpenAPI 3.x, got {version}");
    assert!(document["paths"].is_object(), "paths are documented");
}
}

conformance! {
#[tokio::test]
async fn metrics_are_prometheus_text_that_counts_what_happened() {
    let server = Server::start();
    let api = server.api();
    let merchant = api.create_merchant("Shop", None, None).await;
    let payer = funded(&api, "1").await;
    for _ in 0..3 {
        api.pay(&payer, &merchant, "0.1").await.expect(201);
    }
    api.get_anonymous("/v1/payments")
        .await
        .expect_problem(401, "unauthorized");

    // The counts are the operator's: without its key, or with another party's, there are none.
    api.get_anonymous("/metrics")
        .await
        .expect_problem(401, "unauthorized");
    api.get("/metrics", &payer.key)
        .await
        .expect_problem(404, "not_found");
    let metrics = api.get("/metrics", common::ADMIN_KEY).await;
    assert_eq!(metrics.status, 200);
    assert!(
        metrics.content_type().starts_with("text/plain"),
        "{}",
        metrics.content_type()
    );
    let mut samples = std::collections::HashMap::new();
    for line in metrics.body.lines() {
        if line.is_empty() {
            continue;
        }
        if let Some(comment) = line.strip_prefix('#') {
            let words: Vec<&str> = comment.split_whitespace().collect();
            assert!(
                matches!(words.first(), Some(&"HELP") | Some(&"TYPE")),
                "bad comment line {line:?}"
            );
            if words[0] == "TYPE" {
                assert!(
                    ["counter", "gauge", "histogram", "summary", "untyped"].contains(&words[2]),
                    "bad type in {line:?}"
                );
            }
            continue;
        }
        let (name, value) = line.rsplit_once(' ').expect("`name value`");
        let value: f64 = value
            .parse()
            .unwrap_or_else(|_| panic!("sample value is not a number: {line:?}"));
        let metric = name.split('{').next().unwrap();
        assert!(
            metric
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':'),
            "bad metric name in {line:?}"
        );
        samples.insert(name.to_string(), value);
    }
    match common::Backend::current() {
        // The state is in this process: counting it is free.
        common::Backend::Embedded => assert_eq!(
            samples.get("farthing_payments"),
            Some(&3.0),
            "{}",
            metrics.body
        ),
        // Counting a shared database's rows would cost a scan per scrape: only this process's
        // own commits are counted (3 payments, 2 parties, a top-up, the operator key).
        common::Backend::Postgres => {
            assert_eq!(samples.get("farthing_payments"), None, "{}", metrics.body);
            assert!(
                samples["farthing_journal_records_total"] >= 7.0,
                "{}",
                metrics.body
            );
        }
    }
    assert!(samples["farthing_http_responses_total{class=\"2xx\"}"] >= 6.0);
    assert!(samples["farthing_http_responses_total{class=\"4xx\"}"] >= 1.0);
}
}

conformance! {
#[tokio::test]
async fn payments_in_other_currencies_use_their_own_wallets() {
    let server = Server::start();
    let api = server.api();
    let merchant = api.create_merchant("Shop", None, None).await;
    let payer = funded(&api, "1").await;
    // No EUR wallet yet: nothing to spend.
    let eur = json!({"merchant": merchant.id, "amount": "0.5", "currency": "EUR"});
    api.post("/v1/payments", &payer.key, &eur)
        .await
        .expect_problem(402, "insufficient_funds");
    api.post(
        &format!("/v1/payers/{}/topups", payer.id),
        ADMIN_KEY,
        &json!({"amount": "2", "currency": "EUR", "source": "sandbox"}),
    )
    .await
    .expect(201);
    let paid = api.post("/v1/payments", &payer.key, &eur).await.expect(201);
    assert_eq!(paid["currency"], "EUR");
    let balance = api
        .get(&format!("/v1/payers/{}/balance", payer.id), &payer.key)
        .await
        .expect(200);
    assert_eq!(available(&balance, "USD"), "1.00");
    assert_eq!(available(&balance, "EUR"), "1.50");
    let balance = api
        .get(
            &format!("/v1/merchants/{}/balance", merchant.id),
            &merchant.key,
        )
        .await
        .expect(200);
    assert_eq!(
        balance,
        json!({"balances": [{"currency": "EUR", "available": "0.50"}]})
    );
}
}

conformance! {
#[tokio::test]
async fn a_currency_code_in_lower_case_is_the_same_currency_and_answers_in_upper_case() {
    let server = Server::start();
    let api = server.api();
    let merchant = api.create_merchant("Shop", None, None).await;
    let payer = api.create_payer("Ada").await;
    let topup = api
        .post(
            &format!("/v1/payers/{}/topups", payer.id),
            ADMIN_KEY,
            &json!({"amount": "1", "currency": "usd", "source": "sandbox"}),
        )
        .await
        .expect(201);
    assert_eq!(topup["currency"], "USD");
    let paid = api
        .post(
            "/v1/payments",
            &payer.key,
            &json!({"merchant": merchant.id, "amount": "0.25", "currency": "Usd"}),
        )
        .await
        .expect(201);
    assert_eq!(paid["currency"], "USD");
    // One wallet, not two.
    assert_eq!(api.payer_usd(&payer).await, "0.75");
}
}
