//! `farthing copy`: an embedded installation moved to PostgreSQL and back answers every
//! request as the original did, with the same ids, balances, lists, statements, API keys and
//! idempotency keys; and the copy refuses targets that are not empty and sources in use.
//!
//! Needs `FARTHING_TEST_DATABASE_URL` (a fresh database is made per test); without it the
//! tests that need PostgreSQL say they were skipped.

mod common;

use std::path::Path;
use std::process::{Command, Output};
use std::time::Duration;

use common::TestDatabase;
use common::{ADMIN_KEY, Api, Party, Server, TempDir};
use serde_json::{Value, json};

fn copy(from: &str, to: &str) -> Output {
    Command::new(env!("CARGO_BIN_EXE_farthing"))
        .args(["copy", "--from", from, "--to", to])
        .env_remove("FARTHING_LOG")
        .output()
        .expect("run farthing copy")
}

fn path(dir: &Path) -> &str {
    dir.to_str().expect("a UTF-8 temporary path")
}

#[track_caller]
fn succeeded(output: &Output) -> String {
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    assert!(
        output.status.success(),
        "farthing copy failed: {}\n{stdout}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(stdout.contains("copy verified:"), "{stdout}");
    stdout
}

#[track_caller]
fn failed(output: &Output, reason: &str) {
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success(), "farthing copy should have failed");
    assert!(stderr.contains(reason), "{reason:?} not in: {stderr}");
    assert!(!String::from_utf8_lossy(&output.stdout).contains("copy verified"));
}

/// What the installation made by [`populate`] holds.
struct World {
    merchants: Vec<Party>,
    payers: Vec<Party>,
    payments: Vec<String>,
    /// A request sent with an idempotency key, and its first answer.
    idempotent: (Value, String, Value),
}

/// Merchants, payers, top-ups (one declined), payments (one declined, one batch), refunds in
/// part and in full, and a payment under an idempotency key.
async fn populate(api: &Api) -> World {
    let shop = api.create_merchant("Shop", Some(250), Some("0.01")).await;
    let cafe = api.create_merchant("Café", None, None).await;
    let ada = api.create_payer("Ada").await;
    let bob = api.create_payer("Bob").await;
    let cy = api.create_payer("Cy").await;
    api.topup(&ada, "100").await;
    api.topup(&bob, "20").await;
    api.post(
        &format!("/v1/payers/{}/topups", cy.id),
        ADMIN_KEY,
        &json!({ "amount": "5", "currency": "EUR", "source": "sandbox" }),
    )
    .await
    .expect(201);
    api.post(
        &format!("/v1/payers/{}/topups", bob.id),
        ADMIN_KEY,
        &json!({ "amount": "5", "currency": "USD", "source": "sandbox_decline" }),
    )
    .await
    .expect_problem(402, "funding_declined");

    let mut payments = Vec::new();
    for (payer, merchant, amount) in [
        (&ada, &shop, "3.25"),
        (&ada, &cafe, "0.0025"),
        (&bob, &shop, "7"),
        (&ada, &shop, "10"),
        (&bob, &cafe, "1.5"),
    ] {
        let paid = api.pay(payer, merchant, amount).await.expect(201);
        payments.push(paid["id"].as_str().expect("id").to_string());
    }
    // Declined: more than Bob holds.
    api.pay(&bob, &shop, "500")
        .await
        .expect_problem(402, "insufficient_funds");
    let item = |payer: &Party, merchant: &Party, amount: &str| json!({"payer": payer.id, "merchant": merchant.id, "amount": amount, "currency": "USD"});
    let batch = api
        .post(
            "/v1/payments/batch",
            ADMIN_KEY,
            &json!({"payments": [item(&ada, &cafe, "1"), item(&bob, &cafe, "999"), item(&ada, &shop, "2")]}),
        )
        .await
        .expect(200);
    let results = batch["results"].as_array().expect("results");
    assert_eq!(results[1]["code"], "insufficient_funds", "{batch}");
    for result in results {
        if let Some(id) = result["id"].as_str() {
            payments.push(id.to_string());
        }
    }
    assert_eq!(payments.len(), 7, "{batch}");
    api.post(
        &format!("/v1/payments/{}/refunds", payments[0]),
        &shop.key,
        &json!({"amount": "1"}),
    )
    .await
    .expect(201);
    api.post(
        &format!("/v1/payments/{}/refunds", payments[2]),
        ADMIN_KEY,
        &json!({}),
    )
    .await
    .expect(201);
    let body =
        json!({"merchant": cafe.id, "amount": "0.5", "currency": "USD", "description": "tea"});
    let first = api
        .post_idempotent("/v1/payments", &ada.key, &body, "order-42")
        .await
        .expect(201);
    payments.push(first["id"].as_str().expect("id").to_string());
    World {
        merchants: vec![shop, cafe],
        payers: vec![ada, bob, cy],
        payments,
        idempotent: (body, "order-42".to_string(), first),
    }
}

/// Every page of a list, `limit` at a time, following `starting_after`.
async fn all_pages(api: &Api, path: &str, key: &str) -> Vec<Value> {
    let mut all = Vec::new();
    let mut cursor: Option<String> = None;
    loop {
        let page_path = match &cursor {
            None => format!("{path}?limit=2"),
            Some(id) => format!("{path}?limit=2&starting_after={id}"),
        };
        let page = api.get(&page_path, key).await.expect(200);
        let data = page["data"].as_array().expect("data").clone();
        cursor = data
            .last()
            .map(|item| item["id"].as_str().expect("id").to_string());
        all.extend(data);
        if page["has_more"] != json!(true) {
            return all;
        }
    }
}

/// Everything the API answers about the installation, asked with each party's own key and
/// the operator's.
async fn answers(api: &Api, world: &World) -> Vec<(String, Value)> {
    let mut out = Vec::new();
    for payer in &world.payers {
        let balance = format!("/v1/payers/{}/balance", payer.id);
        let statement = format!("/v1/payers/{}/transactions", payer.id);
        for key in [payer.key.as_str(), ADMIN_KEY] {
            out.push((
                format!("{balance} as {key}"),
                api.get(&balance, key).await.expect(200),
            ));
            out.push((
                format!("{statement} as {key}"),
                Value::Array(all_pages(api, &statement, key).await),
            ));
        }
        out.push((
            format!("payments of {}", payer.id),
            Value::Array(all_pages(api, "/v1/payments", &payer.key).await),
        ));
    }
    for merchant in &world.merchants {
        let balance = format!("/v1/merchants/{}/balance", merchant.id);
        out.push((
            balance.clone(),
            api.get(&balance, &merchant.key).await.expect(200),
        ));
        out.push((
            format!("payments of {}", merchant.id),
            Value::Array(all_pages(api, "/v1/payments", &merchant.key).await),
        ));
    }
    out.push((
        "every payment".to_string(),
        Value::Array(all_pages(api, "/v1/payments", ADMIN_KEY).await),
    ));
    for id in &world.payments {
        let path = format!("/v1/payments/{id}");
        out.push((path.clone(), api.get(&path, ADMIN_KEY).await.expect(200)));
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_installation_copied_to_postgresql_and_back_answers_exactly_as_the_original() {
    let Some(db) = TestDatabase::for_test(
        "an_installation_copied_to_postgresql_and_back_answers_exactly_as_the_original",
    ) else {
        return;
    };
    let original_dir = TempDir::new();
    let back_dir = TempDir::new();
    let back = back_dir.path().join("back");

    let mut server = Server::start_in(original_dir.path(), &[]);
    let api = server.api();
    let world = populate(&api).await;
    let before = answers(&api, &world).await;
    assert!(server.terminate(Duration::from_secs(30)).success());

    let to_postgres = copy(path(original_dir.path()), &db.url);
    let report = succeeded(&to_postgres);
    assert!(report.contains("payers 3,"), "{report}");
    assert!(report.contains("USD:"), "{report}");
    let to_embedded = copy(&db.url, path(&back));
    succeeded(&to_embedded);

    let copied = Server::start_in(&back, &[]);
    let api = copied.api();
    let after = answers(&api, &world).await;
    assert_eq!(before.len(), after.len());
    for ((what, was), (_, is)) in before.iter().zip(&after) {
        assert_eq!(was, is, "{what}");
    }

    // The idempotency key still answers its first answer, and the copy goes on taking
    // payments with the same keys.
    let (body, key, first) = &world.idempotent;
    let ada = &world.payers[0];
    let replay = api
        .post_idempotent("/v1/payments", &ada.key, body, key)
        .await;
    assert_eq!(replay.expect(201), *first);
    assert_eq!(replay.header("idempotent-replayed"), Some("true"));
    let paid = api.pay(ada, &world.merchants[1], "0.25").await.expect(201);
    let listed = api.get("/v1/payments?limit=1", &ada.key).await.expect(200);
    assert_eq!(
        listed["data"][0]["id"], paid["id"],
        "a new payment lists first"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_copy_refuses_a_database_that_holds_data_and_a_directory_that_holds_a_journal() {
    let Some(db) = TestDatabase::for_test(
        "a_copy_refuses_a_database_that_holds_data_and_a_directory_that_holds_a_journal",
    ) else {
        return;
    };
    let dir = TempDir::new();
    let mut server = Server::start_in(dir.path(), &[]);
    server.api().create_payer("Ada").await;
    failed(
        &copy(path(dir.path()), &db.url),
        "in use by a running server",
    );
    assert!(server.terminate(Duration::from_secs(30)).success());

    succeeded(&copy(path(dir.path()), &db.url));
    failed(
        &copy(path(dir.path()), &db.url),
        "already holds Farthing data",
    );
    failed(&copy(&db.url, path(dir.path())), "already holds a journal");
    failed(
        &copy(path(dir.path()), path(dir.path())),
        "exactly one of --from and --to",
    );
    let empty = TempDir::new();
    failed(
        &copy(path(empty.path()), &db.url),
        "holds no Farthing journal",
    );
}
