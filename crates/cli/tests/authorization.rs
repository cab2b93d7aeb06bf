//! One party never sees or touches another's objects: such requests are 404, as if the object
//! did not exist, and change nothing.

#[macro_use]
mod common;

use common::{ADMIN_KEY, Api, Party, Server};
use serde_json::{Value, json};

struct World {
    alice: Party,
    bob: Party,
    shop: Party,
    cafe: Party,
    /// Alice → shop, Bob → cafe.
    alice_payment: Value,
    bob_payment: Value,
    bob_topup: Value,
}

async fn world(api: &Api) -> World {
    let shop = api.create_merchant("Shop", Some(100), None).await;
    let cafe = api.create_merchant("Cafe", Some(100), None).await;
    let alice = api.create_payer("Alice").await;
    let bob = api.create_payer("Bob").await;
    api.topup(&alice, "10").await;
    let bob_topup = api.topup(&bob, "10").await;
    let alice_payment = api.pay(&alice, &shop, "2").await.expect(201);
    let bob_payment = api.pay(&bob, &cafe, "3").await.expect(201);
    World {
        alice,
        bob,
        shop,
        cafe,
        alice_payment,
        bob_payment,
        bob_topup,
    }
}

async fn unchanged(api: &Api, w: &World) {
    assert_eq!(api.payer_usd(&w.alice).await, "8.00");
    assert_eq!(api.payer_usd(&w.bob).await, "7.00");
    assert_eq!(api.merchant_usd(&w.shop).await, "1.98");
    assert_eq!(api.merchant_usd(&w.cafe).await, "2.97");
}

conformance! {
#[tokio::test]
async fn a_payer_cannot_read_or_fund_another_payers_wallet() {
    let server = Server::start();
    let api = server.api();
    let w = world(&api).await;
    let bob = &w.bob.id;
    for path in [
        format!("/v1/payers/{bob}/balance"),
        format!("/v1/payers/{bob}/transactions"),
    ] {
        api.get(&path, &w.alice.key)
            .await
            .expect_problem(404, "not_found");
        // Bob himself may.
        api.get(&path, &w.bob.key).await.expect(200);
    }
    for source in ["sandbox", "sandbox_decline"] {
        api.post(
            &format!("/v1/payers/{bob}/topups"),
            &w.alice.key,
            &json!({"amount": "1", "currency": "USD", "source": source}),
        )
        .await
        .expect_problem(404, "not_found");
    }
    // Bob's statement is still one top-up and one payment.
    let statement = api
        .get(&format!("/v1/payers/{bob}/transactions"), &w.bob.key)
        .await
        .expect(200);
    assert_eq!(statement["data"].as_array().unwrap().len(), 2);
    assert_eq!(statement["data"][1]["id"], w.bob_topup["id"]);
    unchanged(&api, &w).await;
}
}

conformance! {
#[tokio::test]
async fn merchants_cannot_read_payer_or_other_merchant_data() {
    let server = Server::start();
    let api = server.api();
    let w = world(&api).await;
    for path in [
        format!("/v1/merchants/{}/balance", w.cafe.id),
        format!("/v1/payers/{}/balance", w.alice.id),
        format!("/v1/payers/{}/transactions", w.alice.id),
    ] {
        api.get(&path, &w.shop.key)
            .await
            .expect_problem(404, "not_found");
    }
    // Nor may a payer read a merchant's balance, even one it paid.
    api.get(
        &format!("/v1/merchants/{}/balance", w.shop.id),
        &w.alice.key,
    )
    .await
    .expect_problem(404, "not_found");
    api.get(&format!("/v1/merchants/{}/balance", w.shop.id), &w.shop.key)
        .await
        .expect(200);
    // A merchant cannot top up a payer.
    api.post(
        &format!("/v1/payers/{}/topups", w.alice.id),
        &w.shop.key,
        &json!({"amount": "1", "currency": "USD", "source": "sandbox"}),
    )
    .await
    .expect_problem(404, "not_found");
    unchanged(&api, &w).await;
}
}

conformance! {
#[tokio::test]
async fn a_payment_is_hidden_from_payers_and_merchants_it_does_not_belong_to() {
    let server = Server::start();
    let api = server.api();
    let w = world(&api).await;
    let alice_payment = format!("/v1/payments/{}", w.alice_payment["id"].as_str().unwrap());
    let bob_payment = format!("/v1/payments/{}", w.bob_payment["id"].as_str().unwrap());
    for (path, outsider) in [
        (&alice_payment, &w.bob),
        (&alice_payment, &w.cafe),
        (&bob_payment, &w.alice),
        (&bob_payment, &w.shop),
    ] {
        let hidden = api
            .get(path, &outsider.key)
            .await
            .expect_problem(404, "not_found");
        // Indistinguishable from an id that does not exist.
        let missing = api
            .get(
                &format!("/v1/payments/{}", common::unknown_id("pay")),
                &outsider.key,
            )
            .await
            .expect_problem(404, "not_found");
        assert_eq!(hidden, missing);
    }
    for (path, insider) in [
        (&alice_payment, &w.alice),
        (&alice_payment, &w.shop),
        (&bob_payment, &w.bob),
        (&bob_payment, &w.cafe),
    ] {
        api.get(path, &insider.key).await.expect(200);
    }
}
}

conformance! {
#[tokio::test]
async fn a_merchant_cannot_refund_another_merchants_payment_and_a_payer_cannot_refund_at_all() {
    let server = Server::start();
    let api = server.api();
    let w = world(&api).await;
    let refunds = format!(
        "/v1/payments/{}/refunds",
        w.alice_payment["id"].as_str().unwrap()
    );
    for outsider in [&w.cafe, &w.alice, &w.bob] {
        for body in [json!({}), json!({"amount": "1"})] {
            api.post(&refunds, &outsider.key, &body)
                .await
                .expect_problem(404, "not_found");
        }
    }
    unchanged(&api, &w).await;
    // The payment's own merchant may.
    api.post(&refunds, &w.shop.key, &json!({"amount": "1"}))
        .await
        .expect(201);
    assert_eq!(api.payer_usd(&w.alice).await, "9.00");
}
}

conformance! {
#[tokio::test]
async fn payers_and_merchants_on_operator_routes_get_404_not_found() {
    let server = Server::start();
    let api = server.api();
    let w = world(&api).await;
    let batch = json!({"payments": [
        {"payer": w.bob.id, "merchant": w.shop.id, "amount": "5", "currency": "USD"},
    ]});
    for caller in [&w.alice, &w.shop] {
        api.post("/v1/merchants", &caller.key, &json!({"name": "Mine"}))
            .await
            .expect_problem(404, "not_found");
        api.post("/v1/payers", &caller.key, &json!({"name": "Mine"}))
            .await
            .expect_problem(404, "not_found");
        api.post("/v1/payments/batch", &caller.key, &batch)
            .await
            .expect_problem(404, "not_found");
    }
    // Payments are made with a payer's key only.
    for caller in [&w.shop] {
        api.post(
            "/v1/payments",
            &caller.key,
            &json!({"merchant": w.cafe.id, "amount": "1", "currency": "USD"}),
        )
        .await
        .expect_problem(404, "not_found");
    }
    api.post(
        "/v1/payments",
        ADMIN_KEY,
        &json!({"merchant": w.cafe.id, "amount": "1", "currency": "USD"}),
    )
    .await
    .expect_problem(404, "not_found");
    unchanged(&api, &w).await;
    let all = api.list_all_payments(ADMIN_KEY).await;
    assert_eq!(all.len(), 2, "no party was able to add payments");
}
}

conformance! {
#[tokio::test]
async fn listing_payments_shows_a_payer_or_merchant_only_their_own() {
    let server = Server::start();
    let api = server.api();
    let w = world(&api).await;
    let carol = api.create_payer("Carol").await;
    api.topup(&carol, "5").await;
    let to_cafe = api.pay(&w.alice, &w.cafe, "1").await.expect(201);
    let carol_pays = api.pay(&carol, &w.shop, "1").await.expect(201);

    let ids = |list: Vec<Value>| -> Vec<String> {
        list.iter()
            .map(|p| p["id"].as_str().unwrap().to_string())
            .collect()
    };
    let id = |p: &Value| p["id"].as_str().unwrap().to_string();
    assert_eq!(
        ids(api.list_all_payments(&w.alice.key).await),
        [id(&to_cafe), id(&w.alice_payment)]
    );
    assert_eq!(
        ids(api.list_all_payments(&w.bob.key).await),
        [id(&w.bob_payment)]
    );
    assert_eq!(
        ids(api.list_all_payments(&carol.key).await),
        [id(&carol_pays)]
    );
    assert_eq!(
        ids(api.list_all_payments(&w.shop.key).await),
        [id(&carol_pays), id(&w.alice_payment)]
    );
    assert_eq!(
        ids(api.list_all_payments(&w.cafe.key).await),
        [id(&to_cafe), id(&w.bob_payment)]
    );
    assert_eq!(api.list_all_payments(ADMIN_KEY).await.len(), 4);
    // Someone else's payment is no cursor.
    api.get(
        &format!("/v1/payments?starting_after={}", id(&w.bob_payment)),
        &w.alice.key,
    )
    .await
    .expect_problem(404, "not_found");
    api.get(
        &format!("/v1/payments?starting_after={}", id(&w.bob_payment)),
        &w.shop.key,
    )
    .await
    .expect_problem(404, "not_found");
}
}
