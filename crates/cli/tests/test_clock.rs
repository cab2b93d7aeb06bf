//! The test clock (`serve --test-clock`): the operator moves time forward, every rule that
//! follows time follows it, and it never goes back, across a restart and on PostgreSQL.

#[macro_use]
mod common;

use common::{ADMIN_KEY, Server, TempDir};
use serde_json::json;

const DAY_SECS: u64 = 24 * 60 * 60;

/// The test clock's time, in Unix seconds.
async fn clock_now(api: &common::Api) -> u64 {
    let clock = api.get("/v1/test_clock", ADMIN_KEY).await.expect(200);
    clock["now_unix"].as_u64().expect("now_unix")
}

conformance! {
#[tokio::test]
async fn the_test_clock_moves_expiries_and_list_times_forward_and_never_back() {
    let dir = TempDir::new();
    let server = Server::start_in(dir.path(), &["--test-clock"]);
    let api = server.api();
    let merchant = api.create_merchant("Shop", None, None).await;
    let payer = api.create_payer("Ada").await;
    api.topup(&payer, "10").await;
    let start = clock_now(&api).await;

    let first = json!({"merchant": merchant.id, "amount": "1", "currency": "USD"});
    let paid = api
        .post_idempotent("/v1/payments", &payer.key, &first, "order-1")
        .await
        .expect(201);
    let other = json!({"merchant": merchant.id, "amount": "2", "currency": "USD"});
    api.post_idempotent("/v1/payments", &payer.key, &other, "order-1")
        .await
        .expect_problem(422, "idempotency_key_reused");

    // A day and an hour later, the key has expired: the same key is a new request.
    let moved = api
        .post("/v1/test_clock", ADMIN_KEY, &json!({"advance_seconds": DAY_SECS + 3600}))
        .await
        .expect(200);
    assert_eq!(moved["object"], "test_clock");
    let now = moved["now_unix"].as_u64().expect("now_unix");
    assert!(now >= start + DAY_SECS + 3600, "{moved}");
    let rfc3339 = moved["now"].as_str().expect("now");
    assert!(rfc3339.ends_with('Z') && rfc3339.len() == 20, "{rfc3339}");
    let again = api
        .post_idempotent("/v1/payments", &payer.key, &other, "order-1")
        .await
        .expect(201);
    assert_ne!(again["id"], paid["id"]);
    // Lists carry the moved time, newest first.
    let created = again["created_at"].as_u64().expect("created_at");
    assert!(created >= start + DAY_SECS + 3600, "{again}");
    let listed = api.get("/v1/payments", &payer.key).await.expect(200);
    assert_eq!(listed["data"][0]["id"], again["id"]);
    assert!(listed["data"][1]["created_at"].as_u64().expect("created_at") < start + 60);

    // A step retried under its idempotency key moves the clock once.
    let step = json!({"advance_seconds": 600});
    let stepped = api.post_idempotent("/v1/test_clock", ADMIN_KEY, &step, "step-1").await;
    let first_step = stepped.expect(200);
    let retried = api.post_idempotent("/v1/test_clock", ADMIN_KEY, &step, "step-1").await;
    assert_eq!(retried.header("idempotent-replayed"), Some("true"));
    assert_eq!(retried.expect(200), first_step);
    let stepped_to = first_step["now_unix"].as_u64().expect("now_unix");
    assert!(stepped_to >= now + 600);
    assert!(clock_now(&api).await < stepped_to + 600, "the retry moved the clock again");

    // Time only moves forward.
    for bad in [json!({"advance_seconds": -1}), json!({"advance_seconds": 1.5}), json!({})] {
        api.post("/v1/test_clock", ADMIN_KEY, &bad)
            .await
            .expect_problem(422, "validation_failed");
    }
    // Only the operator moves it.
    api.post("/v1/test_clock", &payer.key, &json!({"advance_seconds": 1}))
        .await
        .expect_problem(404, "not_found");

    // Across a restart, the clock resumes where it was, not at the wall clock.
    drop(api);
    drop(server);
    let server = Server::start_in(dir.path(), &["--test-clock"]);
    let api = server.api();
    assert!(clock_now(&api).await >= now);
    let after = api.pay(&payer, &merchant, "1").await.expect(201);
    assert!(after["created_at"].as_u64().expect("created_at") >= now);
}
}

conformance! {
#[tokio::test]
async fn without_the_flag_there_is_no_test_clock() {
    let server = Server::start();
    let api = server.api();
    api.post("/v1/test_clock", ADMIN_KEY, &json!({"advance_seconds": 60}))
        .await
        .expect_problem(404, "not_found");
    api.get("/v1/test_clock", ADMIN_KEY)
        .await
        .expect_problem(404, "not_found");
}
}
